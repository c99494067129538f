//! The tokenizer, built from GGUF metadata (`tokenizer.ggml.*`) so that it gives the
//! same ids as llama.cpp's `/tokenize` with `parse_special`.
//!
//! Two vocab kinds:
//! - `gpt2`: byte-level BPE from `tokens` + `merges`. The pre-tokenizer is llama.cpp's
//!   regex table for `tokenizer.ggml.pre`: the regexes run in sequence, each splitting
//!   the pieces of the one before, and both matches and the gaps between them are kept.
//! - `llama`: a SentencePiece vocab with `scores`. llama.cpp repeatedly merges the
//!   adjacent pair whose concatenation is the highest-scoring piece; that is a BPE whose
//!   merge ranks are the scores of the merged pieces, with byte fallback (`<0xXX>`).
//!
//! Invariants:
//! - Ids are GGUF ids: id `i` is `tokenizer.ggml.tokens[i]`, `vocab_size() == tokens.len()`.
//! - Control (type 3) and unknown (type 2) tokens are *special*: `encode` matches them
//!   verbatim inside text, `decode_skip_special` drops them. User-defined tokens (type 4)
//!   are matched verbatim too but are not special.
//! - `decode(ids)` is the lossy UTF-8 of the concatenated [`Tokenizer::token_bytes`]
//!   (llama.cpp's `token_to_piece`: byte-level pieces mapped back to bytes, `▁` to a space,
//!   `<0xXX>` to its byte, special tokens as their text), minus one leading space for
//!   SentencePiece vocabs with a space prefix. There is no space clean-up, so
//!   `decode(encode(s)) == s` for text the vocab covers. The `tokenizers` crate only encodes.
//! - The deltas of a [`StreamDecoder`] plus its `finish()` concatenate to exactly `decode`
//!   of the same ids; an incomplete UTF-8 sequence is held back until it completes.

use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::models::bpe::{BpeBuilder, Merges, Vocab};
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{ModelError, Result};

const TYPE_NORMAL: i32 = 1;
const TYPE_UNKNOWN: i32 = 2;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_BYTE: i32 = 6;
/// SentencePiece's visible space.
const SPM_SPACE: char = '\u{2581}';

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VocabKind {
    ByteLevelBpe,
    SentencePiece,
}

/// Per-id data shared with stream decoders.
#[derive(Debug)]
struct TokenTable {
    bytes: Vec<Box<[u8]>>,
    special: Vec<bool>,
    strip_leading_space: bool,
}

impl TokenTable {
    fn bytes_of(&self, id: u32, skip_special: bool) -> Result<&[u8]> {
        let i = id as usize;
        let bytes = self
            .bytes
            .get(i)
            .ok_or_else(|| ModelError::Tokenizer(format!("token id {id} out of range (vocab {})", self.bytes.len())))?;
        Ok(if skip_special && self.special[i] { &[] } else { bytes })
    }
}

/// A GGUF vocab turned into a `tokenizers` pipeline plus the per-id byte table.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    table: Arc<TokenTable>,
    tokens: Arc<[String]>,
    bos: Option<u32>,
    eos: u32,
    add_bos: bool,
    add_eos: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .finish()
    }
}

/// The `tokenizer.ggml.*` arrays.
struct GgufVocab {
    model: String,
    pre: Option<String>,
    tokens: Vec<String>,
    types: Vec<i32>,
    scores: Vec<f32>,
    merges: Vec<String>,
}

impl Tokenizer {
    /// Builds the tokenizer from the metadata of a GGUF file.
    pub fn from_gguf(content: &Content) -> Result<Tokenizer> {
        let mut vocab = GgufVocab::read(content)?;
        let kind = match vocab.model.as_str() {
            "gpt2" => VocabKind::ByteLevelBpe,
            "llama" => VocabKind::SentencePiece,
            other => {
                return Err(ModelError::Tokenizer(format!(
                    "unsupported tokenizer model `{other}` (supported: gpt2, llama)"
                )));
            }
        };
        let n = vocab.tokens.len();
        let bos = token_id_key(content, "tokenizer.ggml.bos_token_id", n)?;
        let eos = token_id_key(content, "tokenizer.ggml.eos_token_id", n)?
            .ok_or_else(|| bad_key("tokenizer.ggml.eos_token_id", "missing"))?;
        let unk = token_id_key(content, "tokenizer.ggml.unknown_token_id", n)?;
        if !content.metadata.contains_key("tokenizer.ggml.token_type") {
            for id in [bos, Some(eos), unk].into_iter().flatten() {
                vocab.types[id as usize] = TYPE_CONTROL;
            }
        }
        let spm = kind == VocabKind::SentencePiece;
        let space_prefix = meta(content, "tokenizer.ggml.add_space_prefix", Value::to_bool)?.unwrap_or(spm);
        let mut inner = match kind {
            VocabKind::ByteLevelBpe => build_byte_level(&vocab)?,
            VocabKind::SentencePiece => build_sentencepiece(&vocab, unk, space_prefix)?,
        };
        add_verbatim_tokens(&mut inner, &vocab)?;
        let default_bos = spm || vocab.pre.as_deref().is_some_and(llama3_family);
        let table = TokenTable {
            bytes: token_byte_table(kind, &vocab),
            special: vocab.types.iter().map(|&t| is_special_type(t)).collect(),
            strip_leading_space: spm && space_prefix,
        };
        Ok(Tokenizer {
            inner,
            table: Arc::new(table),
            tokens: vocab.tokens.into(),
            bos,
            eos,
            add_bos: meta(content, "tokenizer.ggml.add_bos_token", Value::to_bool)?.unwrap_or(default_bos),
            add_eos: meta(content, "tokenizer.ggml.add_eos_token", Value::to_bool)?.unwrap_or(false),
        })
    }

    /// Token ids of `text`; special-token text inside it becomes the special ids. BOS
    /// is prepended when the model asks for it (`add_bos_token`) and the text does not
    /// already start with it (chat templates often render `bos_token` themselves).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    /// Like [`Tokenizer::encode`]; `add_special == false` never adds BOS or EOS.
    pub fn encode_with(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let encoding =
            self.inner.encode_fast(text, false).map_err(|e| ModelError::Tokenizer(format!("encode: {e}")))?;
        let body = encoding.get_ids();
        let mut ids = Vec::with_capacity(body.len() + 2);
        if let Some(bos) = self.bos.filter(|_| add_special && self.add_bos) {
            if body.first() != Some(&bos) {
                ids.push(bos);
            }
        }
        ids.extend_from_slice(body);
        if add_special && self.add_eos {
            ids.push(self.eos);
        }
        Ok(ids)
    }

    /// Text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_bytes(ids, false)
    }

    /// Text of `ids` without the special (control and unknown) tokens.
    pub fn decode_skip_special(&self, ids: &[u32]) -> Result<String> {
        self.decode_bytes(ids, true)
    }

    fn decode_bytes(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            bytes.extend_from_slice(self.table.bytes_of(id, skip_special)?);
        }
        let start = usize::from(self.table.strip_leading_space && bytes.first() == Some(&b' '));
        Ok(String::from_utf8_lossy(&bytes[start..]).into_owned())
    }

    /// A decoder for text generated one token at a time.
    pub fn stream_decoder(&self, skip_special: bool) -> StreamDecoder {
        StreamDecoder { table: Arc::clone(&self.table), skip_special, pending: Vec::new(), at_start: true }
    }

    /// The bytes a token stands for in decoded text (may be part of a UTF-8 sequence).
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.table.bytes.get(id as usize).map(|b| &b[..])
    }

    /// Number of tokens in the vocab (the GGUF `tokens` array).
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The id of a token given its vocab text (e.g. `<|im_end|>`, or `Ġhello` for byte-level BPE).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocab text of a token.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos.and_then(|id| self.token_text(id))
    }

    pub fn eos_token(&self) -> &str {
        self.token_text(self.eos).unwrap_or_default()
    }

    /// Whether `id` is a control or unknown token.
    pub fn is_special(&self, id: u32) -> bool {
        self.table.special.get(id as usize).copied().unwrap_or(false)
    }
}

/// Turns a stream of token ids into text deltas that are always whole UTF-8 characters.
///
/// `push` returns what became complete (often empty while a multi-byte character is split
/// across tokens); `finish` flushes an incomplete tail as U+FFFD, exactly as `decode` would.
#[derive(Debug)]
pub struct StreamDecoder {
    table: Arc<TokenTable>,
    skip_special: bool,
    pending: Vec<u8>,
    at_start: bool,
}

impl StreamDecoder {
    /// Adds one token and returns the text it completes.
    pub fn push(&mut self, id: u32) -> Result<String> {
        let bytes = self.table.bytes_of(id, self.skip_special)?;
        let mut bytes = bytes;
        if self.at_start && !bytes.is_empty() {
            self.at_start = false;
            if self.table.strip_leading_space && bytes[0] == b' ' {
                bytes = &bytes[1..];
            }
        }
        self.pending.extend_from_slice(bytes);
        Ok(self.take_complete())
    }

    /// Returns what is held back (an incomplete UTF-8 sequence, as U+FFFD) and resets.
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }

    /// Emits every complete character and every invalid sequence (as U+FFFD, like
    /// `from_utf8_lossy`), keeping only an incomplete sequence at the very end.
    fn take_complete(&mut self) -> String {
        let mut out = String::new();
        let mut start = 0;
        while start < self.pending.len() {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                }
                Err(e) => {
                    let valid = start + e.valid_up_to();
                    out.push_str(&String::from_utf8_lossy(&self.pending[start..valid]));
                    let Some(bad) = e.error_len() else {
                        start = valid;
                        break;
                    };
                    out.push('\u{FFFD}');
                    start = valid + bad;
                }
            }
        }
        self.pending.drain(..start);
        out
    }
}

fn is_special_type(t: i32) -> bool {
    t == TYPE_CONTROL || t == TYPE_UNKNOWN
}

fn tok_err(what: &str) -> impl Fn(tokenizers::Error) -> ModelError + '_ {
    move |e| ModelError::Tokenizer(format!("{what}: {e}"))
}

fn bad_key(key: &str, reason: impl Into<String>) -> ModelError {
    ModelError::Metadata { key: key.to_string(), reason: reason.into() }
}

/// `key` converted by `get`: `None` when absent, an error naming the key when mistyped.
fn meta<'a, T>(
    content: &'a Content,
    key: &str,
    get: impl Fn(&'a Value) -> candle_core::Result<T>,
) -> Result<Option<T>> {
    let value = content.metadata.get(key);
    value.map(|v| get(v).map_err(|e| bad_key(key, e.to_string()))).transpose()
}

/// An integer of any width, as converters write ids with differing types.
fn value_as_i64(v: &Value) -> Option<i64> {
    match *v {
        Value::U8(x) => Some(x.into()),
        Value::I8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::I16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::I32(x) => Some(x.into()),
        Value::U64(x) => i64::try_from(x).ok(),
        Value::I64(x) => Some(x),
        _ => None,
    }
}

/// A token id key; absent or negative (llama.cpp's "none") is `None`.
fn token_id_key(content: &Content, key: &str, n_vocab: usize) -> Result<Option<u32>> {
    let Some(v) = content.metadata.get(key) else {
        return Ok(None);
    };
    let id = value_as_i64(v).ok_or_else(|| bad_key(key, "not an integer"))?;
    if id < 0 {
        return Ok(None);
    }
    match u32::try_from(id) {
        Ok(id) if (id as usize) < n_vocab => Ok(Some(id)),
        _ => Err(bad_key(key, format!("id {id} outside the vocab of {n_vocab}"))),
    }
}

impl GgufVocab {
    fn read(content: &Content) -> Result<GgufVocab> {
        let model = meta(content, "tokenizer.ggml.model", Value::to_string)?
            .ok_or_else(|| bad_key("tokenizer.ggml.model", "missing"))?
            .clone();
        let pre = meta(content, "tokenizer.ggml.pre", Value::to_string)?.cloned();
        let tokens =
            strings(content, "tokenizer.ggml.tokens")?.ok_or_else(|| bad_key("tokenizer.ggml.tokens", "missing"))?;
        let n = tokens.len();
        let types = match meta(content, "tokenizer.ggml.token_type", Value::to_vec)? {
            Some(a) => a.iter().map(|v| value_as_i64(v).map(|t| t as i32)).collect(),
            None => Some(vec![TYPE_NORMAL; n]),
        };
        let types = types.ok_or_else(|| bad_key("tokenizer.ggml.token_type", "not integers"))?;
        let scores = match meta(content, "tokenizer.ggml.scores", Value::to_vec)? {
            Some(a) => a.iter().map(|v| v.to_f32().ok()).collect(),
            None => Some(Vec::new()),
        };
        let scores = scores.ok_or_else(|| bad_key("tokenizer.ggml.scores", "not f32"))?;
        let merges = strings(content, "tokenizer.ggml.merges")?.unwrap_or_default();
        if types.len() != n || !(scores.is_empty() || scores.len() == n) {
            return Err(bad_key("tokenizer.ggml.token_type", "length differs from tokens"));
        }
        Ok(GgufVocab { model, pre, tokens, types, scores, merges })
    }

    /// Vocab text -> id; a duplicated text keeps its last id, as in llama.cpp.
    fn vocab(&self) -> Vocab {
        self.tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect()
    }
}

fn strings(content: &Content, key: &str) -> Result<Option<Vec<String>>> {
    let Some(array) = meta(content, key, Value::to_vec)? else {
        return Ok(None);
    };
    let strings = array.iter().map(|v| v.to_string().ok().cloned()).collect::<Option<Vec<_>>>();
    strings.map(Some).ok_or_else(|| bad_key(key, "not an array of strings"))
}

/// Pre-tokenizers of llama.cpp (`llm_tokenizer_bpe` in llama-vocab.cpp) by `tokenizer.ggml.pre`.
struct PreSplit {
    regexes: &'static [&'static str],
    ignore_merges: bool,
}

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
// Three ranges are written as escapes: the upstream source has their ends NFC-normalized,
// which inverts them (e.g. U+1F7D became U+03CE).
const DEEPSEEK_LLM: [&str; 6] = [
    r"[\r\n]",
    r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\x{1F7D}ᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-\x{1FD3}ῖ-\x{1FDB}ῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    r"[一-龥ࠀ-一가-퟿]+",
    r"\p{N}+",
];
const DEEPSEEK_CODER: [&str; 5] = [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"];
const FALCON: [&str; 3] = [r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"];
const DEFAULT: [&str; 4] = [r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"];

fn llama3_family(pre: &str) -> bool {
    matches!(pre, "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral")
}

fn pre_split(pre: &str) -> PreSplit {
    let (regexes, ignore_merges): (&'static [&'static str], bool) = match pre {
        p if llama3_family(p) => (&[LLAMA3], true),
        "dbrx" | "smaug-bpe" => (&[LLAMA3], false),
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" => (&[QWEN2], false),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            (&[r"\p{N}", GPT2], false)
        }
        "gpt-2" | "gpt2" | "phi-2" | "mpt" | "olmo" | "jais" | "trillion" => (&[GPT2], false),
        "deepseek-llm" => (&DEEPSEEK_LLM, false),
        "deepseek-coder" => (&DEEPSEEK_CODER, false),
        "falcon" => (&FALCON, false),
        "default" => (&DEFAULT, false),
        other => {
            eprintln!("warning: unknown tokenizer.ggml.pre `{other}`, using the GPT-2 pre-tokenizer");
            (&[GPT2], false)
        }
    };
    PreSplit { regexes, ignore_merges }
}

fn build_byte_level(v: &GgufVocab) -> Result<tokenizers::Tokenizer> {
    let split = pre_split(v.pre.as_deref().unwrap_or("default"));
    let merges = v
        .merges
        .iter()
        .map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
        .collect::<Option<Merges>>()
        .ok_or_else(|| bad_key("tokenizer.ggml.merges", "a merge has no space"))?;
    let bpe = BpeBuilder::new()
        .vocab_and_merges(v.vocab(), merges)
        .ignore_merges(split.ignore_merges)
        .build()
        .map_err(tok_err("byte-level BPE"))?;
    let mut steps = Vec::with_capacity(split.regexes.len() + 1);
    for re in split.regexes {
        let pattern = SplitPattern::Regex((*re).to_string());
        let step = Split::new(pattern, SplitDelimiterBehavior::Isolated, false);
        steps.push(PreTokenizerWrapper::Split(step.map_err(tok_err("pre-tokenizer regex"))?));
    }
    // The regexes above do the splitting; ByteLevel only maps bytes to its alphabet.
    let byte_level = ByteLevel::new(false, false, false);
    steps.push(PreTokenizerWrapper::ByteLevel(byte_level));
    let mut tk = tokenizers::Tokenizer::new(bpe);
    tk.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::sequence::Sequence::new(steps)));
    Ok(tk)
}

/// BPE merges of a SentencePiece vocab: every split of a piece into two pieces, ranked by
/// the score of the merged piece (highest first), as HF's `SentencePieceExtractor` does.
fn sentencepiece_merges(v: &GgufVocab, vocab: &Vocab) -> Merges {
    let mergeable = |id: u32| matches!(v.types[id as usize], TYPE_NORMAL | TYPE_USER_DEFINED);
    let mut ranked: Vec<(f32, u32, u32, u32)> = Vec::new();
    for (id, piece) in v.tokens.iter().enumerate() {
        if !mergeable(id as u32) {
            continue;
        }
        for (i, _) in piece.char_indices().skip(1) {
            let (l, r) = (vocab.get(&piece[..i]), vocab.get(&piece[i..]));
            if let (Some(&l), Some(&r)) = (l, r) {
                if mergeable(l) && mergeable(r) {
                    ranked.push((v.scores[id], id as u32, l, r));
                }
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2, a.3).cmp(&(b.1, b.2, b.3))));
    let text = |id: u32| v.tokens[id as usize].clone();
    ranked.into_iter().map(|(_, _, l, r)| (text(l), text(r))).collect()
}

fn build_sentencepiece(v: &GgufVocab, unk: Option<u32>, space_prefix: bool) -> Result<tokenizers::Tokenizer> {
    if v.scores.len() != v.tokens.len() {
        return Err(bad_key("tokenizer.ggml.scores", "missing for a `llama` vocab"));
    }
    let vocab = v.vocab();
    let merges = sentencepiece_merges(v, &vocab);
    let mut builder = BpeBuilder::new().vocab_and_merges(vocab, merges).byte_fallback(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(v.tokens[unk as usize].clone()).fuse_unk(true);
    }
    let bpe = builder.build().map_err(tok_err("SentencePiece BPE"))?;
    let space = SPM_SPACE.to_string();
    let escape = Replace::new(" ", space.as_str()).map_err(tok_err("normalizer"))?;
    let mut normalizers = vec![NormalizerWrapper::Replace(escape)];
    if space_prefix {
        normalizers.insert(0, NormalizerWrapper::Prepend(Prepend::new(space.clone())));
    }
    let mut tk = tokenizers::Tokenizer::new(bpe);
    let normalizer = tokenizers::normalizers::Sequence::new(normalizers);
    tk.with_normalizer(Some(normalizer)).map_err(tok_err("normalizer"))?;
    Ok(tk)
}

/// Registers control/unknown tokens as special and user-defined tokens as plain added
/// tokens, so that their text is matched verbatim (before normalization) in `encode`.
fn add_verbatim_tokens(tk: &mut tokenizers::Tokenizer, v: &GgufVocab) -> Result<()> {
    let (mut special, mut user) = (Vec::new(), Vec::new());
    for (text, &ty) in v.tokens.iter().zip(&v.types) {
        if text.is_empty() {
            continue;
        }
        if is_special_type(ty) {
            special.push(AddedToken::from(text.clone(), true));
        } else if ty == TYPE_USER_DEFINED {
            user.push(AddedToken::from(text.clone(), false).normalized(false));
        }
    }
    tk.add_special_tokens(special).map_err(tok_err("special tokens"))?;
    tk.add_tokens(user).map_err(tok_err("user-defined tokens"))?;
    Ok(())
}

/// GPT-2's byte -> char map (printable bytes map to themselves, the rest to U+0100..).
fn byte_level_alphabet() -> [char; 256] {
    let mut chars = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        chars[b as usize] = if matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
            char::from(b)
        } else {
            next += 1;
            char::from_u32(next - 1).unwrap_or('\0')
        };
    }
    chars
}

fn token_byte_table(kind: VocabKind, v: &GgufVocab) -> Vec<Box<[u8]>> {
    let mut byte_of_char = std::collections::HashMap::with_capacity(256);
    for (b, c) in byte_level_alphabet().into_iter().enumerate() {
        byte_of_char.insert(c, b as u8);
    }
    let unmap = |text: &str| -> Vec<u8> {
        let bytes: Option<Vec<u8>> = text.chars().map(|c| byte_of_char.get(&c).copied()).collect();
        bytes.unwrap_or_else(|| text.as_bytes().to_vec())
    };
    let piece = |text: &str, ty: i32| -> Vec<u8> {
        match kind {
            _ if is_special_type(ty) => text.as_bytes().to_vec(),
            VocabKind::ByteLevelBpe if ty == TYPE_USER_DEFINED => text.as_bytes().to_vec(),
            VocabKind::ByteLevelBpe => unmap(text),
            VocabKind::SentencePiece if ty == TYPE_BYTE => {
                parse_byte_token(text).map(|b| vec![b]).unwrap_or_else(|| text.as_bytes().to_vec())
            }
            VocabKind::SentencePiece => text.replace(SPM_SPACE, " ").into_bytes(),
        }
    };
    v.tokens.iter().zip(&v.types).map(|(t, &ty)| piece(t, ty).into_boxed_slice()).collect()
}

/// `<0xAB>` -> 0xAB.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok()).flatten()
}
