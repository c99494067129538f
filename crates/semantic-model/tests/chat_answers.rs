//! Greedy answers of the real default model to factual chat questions.

mod common;

use semantic_core::SamplingParams;
use semantic_kv::KvPool;
use semantic_model::generate::generate;
use semantic_model::{ChatMessage, ChatTemplate, Tokenizer};

#[test]
fn greedy_answers_contain_the_expected_words() {
    let (g, model) = common::load();
    let tok = Tokenizer::from_gguf(g.content()).unwrap();
    let tpl = ChatTemplate::from_gguf(g.content(), &tok).unwrap();
    let stop = tpl.stop_token_ids(&tok);
    let mut pool = KvPool::new(model.kv_layout(16), 32);
    let cases = [
        ("What is the capital of France? Answer in one word.", "Paris"),
        ("What color is the sky on a clear day?", "blue"),
        ("How many days are in a week?", "7"),
        ("What is 2 + 2?", "4"),
        ("Who wrote Romeo and Juliet?", "Shakespeare"),
        ("What gas do plants absorb from the air?", "carbon dioxide"),
    ];
    let params = SamplingParams { max_tokens: 40, ..Default::default() };
    for (q, want) in cases {
        let text = tpl.render(&[ChatMessage::user(q)], true, None).unwrap();
        let ids = tok.encode(&text).unwrap();
        let mut streamed = String::new();
        let out = generate(&model, &tok, &mut pool, &ids, &params, &stop, |t| streamed.push_str(t)).unwrap();
        assert_eq!(streamed, out.text, "streamed deltas add up to the reply");
        assert!(out.text.contains(want), "{q:?} -> {:?} lacks {want:?}", out.text);
        assert_eq!(pool.n_free(), 32, "generation returned its blocks");
    }
}

#[test]
fn stop_strings_and_max_tokens_end_generation() {
    let (g, model) = common::load();
    let tok = Tokenizer::from_gguf(g.content()).unwrap();
    let tpl = ChatTemplate::from_gguf(g.content(), &tok).unwrap();
    let stop = tpl.stop_token_ids(&tok);
    let mut pool = KvPool::new(model.kv_layout(16), 32);
    let text =
        tpl.render(&[ChatMessage::user("What is the capital of France? Answer in one word.")], true, None).unwrap();
    let ids = tok.encode(&text).unwrap();
    let params = SamplingParams { max_tokens: 40, stop: vec![" is".into()], ..Default::default() };
    let out = generate(&model, &tok, &mut pool, &ids, &params, &stop, |_| {}).unwrap();
    assert_eq!(out.text, "The capital of France");
    assert_eq!(out.finish, semantic_core::FinishReason::StopString);
    let params = SamplingParams { max_tokens: 3, ..Default::default() };
    let out = generate(&model, &tok, &mut pool, &ids, &params, &stop, |_| {}).unwrap();
    assert_eq!((out.tokens.len(), out.finish), (3, semantic_core::FinishReason::Length));
}
