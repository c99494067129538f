//! The engine on the real default model: batching invariance, agent cache
//! reuse, cancellation, and a pool far too small for the load.

use std::time::Duration;

use semantic_core::{AgentId, FinishReason, RequestId, SamplingParams};
use semantic_engine::{EngineConfig, EngineHandle, EngineRequest, SchedulerConfig, TokenEvent, TokenStream, Usage};
use semantic_model::{paths, ChatMessage, ChatTemplate, GgufFile, LlamaModel, Tokenizer};

struct Fixture {
    handle: EngineHandle,
    tok: Tokenizer,
    tpl: ChatTemplate,
}

fn start(kv_pool_mb: usize, step_tokens: usize) -> Fixture {
    let g = GgufFile::open(&paths::test_model_path()).unwrap();
    let model = LlamaModel::load(&g).unwrap();
    let tok = Tokenizer::from_gguf(g.content()).unwrap();
    let tpl = ChatTemplate::from_gguf(g.content(), &tok).unwrap();
    let cfg = EngineConfig {
        block_size: 16,
        kv_pool_bytes: kv_pool_mb << 20,
        scheduler: SchedulerConfig { step_tokens, max_running: 16, max_waiting: 64 },
        hash_salt: 42,
        mixed_step_factor: 2.5,
        persist: None,
    };
    let handle = EngineHandle::spawn(model, tok.clone(), "test".into(), cfg);
    Fixture { handle, tok, tpl }
}

impl Fixture {
    fn request(&self, agent: Option<&str>, msgs: &[ChatMessage], max_tokens: usize) -> EngineRequest {
        let text = self.tpl.render(msgs, true, None).unwrap();
        EngineRequest {
            id: self.handle.next_request_id(),
            agent: agent.map(|a| AgentId::new(a).unwrap()),
            prompt: self.tok.encode(&text).unwrap(),
            params: SamplingParams { max_tokens, ..Default::default() },
            stop_ids: self.tpl.stop_token_ids(&self.tok),
            banned_ids: Vec::new(),
            logprobs: false,
        }
    }
}

/// Collects a whole reply: (token ids, text, finish, usage).
fn collect(mut s: TokenStream) -> (Vec<u32>, String, FinishReason, Usage) {
    let (mut ids, mut text) = (Vec::new(), String::new());
    loop {
        match s.blocking_next().expect("stream ended without Finished") {
            TokenEvent::Token { id, text: t, .. } => {
                ids.push(id);
                text.push_str(&t);
            }
            TokenEvent::Finished { reason, text_tail, usage, .. } => {
                text.push_str(&text_tail);
                return (ids, text, reason, usage);
            }
            TokenEvent::Error(e) => panic!("engine error: {e}"),
        }
    }
}

fn question(i: usize) -> Vec<ChatMessage> {
    let topics = ["the moon", "bread", "rivers", "music", "volcanoes", "bees", "chess", "snow"];
    vec![
        ChatMessage::system(format!("You are agent {i}. Answer briefly.")),
        ChatMessage::user(format!("Tell me one fact about {}.", topics[i % topics.len()])),
    ]
}

#[test]
fn concurrent_agents_get_exactly_their_solo_outputs() {
    let f = start(256, 64);
    let solo: Vec<Vec<u32>> =
        (0..5).map(|i| collect(f.handle.blocking_submit(f.request(None, &question(i), 24)).unwrap()).0).collect();
    // All five at once, as agents, with small prefill chunks so prefills and
    // decodes of different agents share steps.
    let streams: Vec<TokenStream> = (0..5)
        .map(|i| f.handle.blocking_submit(f.request(Some(&format!("agent-{i}")), &question(i), 24)).unwrap())
        .collect();
    for (i, s) in streams.into_iter().enumerate() {
        let (ids, _, _, usage) = collect(s);
        assert_eq!(ids, solo[i], "agent {i} differs from its solo run");
        // The solo runs left their full blocks in the shared index.
        assert!(usage.cached_hot_tokens >= 16, "agent {i}: {usage:?}");
    }
    let stats = f.handle.blocking_stats().unwrap();
    assert_eq!(stats.cached_agents, 5);
    f.handle.shutdown();
}

#[test]
fn an_agents_next_turn_reuses_its_prefix_and_answers_as_a_cold_run() {
    let f = start(128, 512);
    let mut msgs = question(1);
    let (_, first, _, u1) = collect(f.handle.blocking_submit(f.request(Some("coder"), &msgs, 16)).unwrap());
    assert_eq!(u1.cached_hot_tokens, 0);
    msgs.push(ChatMessage::assistant(first));
    msgs.push(ChatMessage::user("And one more?"));
    let warm_req = f.request(Some("coder"), &msgs, 16);
    let prompt_len = warm_req.prompt.len();
    let (warm, _, _, u2) = collect(f.handle.blocking_submit(warm_req).unwrap());
    assert!(u2.cached_hot_tokens > prompt_len / 2, "reused {} of {prompt_len}", u2.cached_hot_tokens);
    // The same conversation cold, on a fresh engine: identical greedy output.
    let g = start(64, 512);
    let (cold, _, _, u3) = collect(g.handle.blocking_submit(g.request(Some("fresh"), &msgs, 16)).unwrap());
    g.handle.shutdown();
    assert_eq!(u3.cached_hot_tokens, 0);
    assert_eq!(warm, cold);
    // An edit in the middle reuses only the part before it.
    let mut edited = msgs.clone();
    edited[1] = ChatMessage::user("Tell me one fact about bread, please.");
    let (_, _, _, u4) = collect(f.handle.blocking_submit(f.request(Some("coder"), &edited, 4)).unwrap());
    assert!(u4.cached_hot_tokens > 0 && u4.cached_hot_tokens < u2.cached_hot_tokens);
    f.handle.shutdown();
}

/// Past 512 tokens of context the attention splits long key ranges between
/// the threads; the reply must not depend on that, on the prompt's
/// chunking, or on a reused prefix (a 703-token chat once answered
/// differently cold and from a shared prefix).
#[test]
fn long_prompts_answer_the_same_cold_chunked_or_from_a_shared_prefix() {
    let facts: String = (0..40).map(|i| format!("Fact {i}: the number {i} squared is {}. ", i * i)).collect();
    let msgs = vec![
        ChatMessage::system(facts),
        ChatMessage::user("What is 7 squared? Answer briefly."),
        ChatMessage::assistant("49."),
        ChatMessage::user("And 12 squared?"),
    ];
    // Token ids and the bits of their logprobs (far more sensitive than
    // the argmax alone).
    let run = |f: &Fixture, agent: Option<&str>| {
        let mut req = f.request(agent, &msgs, 12);
        req.logprobs = true;
        let mut s = f.handle.blocking_submit(req).unwrap();
        let mut out = Vec::new();
        loop {
            match s.blocking_next().expect("a Finished event") {
                TokenEvent::Token { id, logprob, .. } => out.push((id, logprob.map(f32::to_bits))),
                TokenEvent::Finished { usage, .. } => return (out, usage),
                TokenEvent::Error(e) => panic!("{e}"),
            }
        }
    };
    let f = start(128, 512);
    let (cold, u) = run(&f, Some("a"));
    assert!(u.prompt_tokens > 600, "{u:?}");
    // Another agent with the same prompt reuses the full blocks; the first
    // agent again reuses all but the last token.
    let (shared, u2) = run(&f, Some("b"));
    assert!(u2.cached_hot_tokens > 600, "{u2:?}");
    let (again, u3) = run(&f, Some("a"));
    assert!(u3.cached_hot_tokens > u2.cached_hot_tokens, "{u3:?}");
    f.handle.shutdown();
    // Prefilled in chunks of 100 tokens on a fresh engine.
    let g = start(128, 100);
    let (chunked, _) = run(&g, None);
    g.handle.shutdown();
    assert_eq!(shared, cold);
    assert_eq!(again, cold);
    assert_eq!(chunked, cold);
}

#[test]
fn agents_sharing_a_system_prompt_share_its_blocks() {
    let f = start(256, 512);
    let system = format!("You are a careful assistant. {}", "Follow the team rules. ".repeat(60));
    let ask = |q: &str| vec![ChatMessage::system(system.clone()), ChatMessage::user(q)];
    let qa = ask("What is a river?");
    let qb = ask("What is a mountain?");
    let alone_b = {
        let g = start(64, 512);
        let out = collect(g.handle.blocking_submit(g.request(None, &qb, 12)).unwrap()).0;
        g.handle.shutdown();
        out
    };
    let free0 = f.handle.blocking_stats().unwrap().free_blocks;
    let (_, _, _, ua) = collect(f.handle.blocking_submit(f.request(Some("alpha"), &qa, 12)).unwrap());
    let after_a = f.handle.blocking_stats().unwrap().free_blocks;
    let (ids_b, _, _, ub) = collect(f.handle.blocking_submit(f.request(Some("beta"), &qb, 12)).unwrap());
    let after_b = f.handle.blocking_stats().unwrap().free_blocks;
    assert_eq!(ids_b, alone_b, "sharing never changes the output");
    let shared = ub.cached_hot_tokens;
    assert_eq!(ua.cached_hot_tokens, 0);
    assert!(shared >= 16 * ((ua.prompt_tokens - 20) / 16), "beta reused {shared} tokens");
    // Pool accounting: beta only added the blocks of its own suffix.
    let used_a = free0 - after_a;
    let used_b = after_a - after_b;
    let own_b = (ub.prompt_tokens + 12).div_ceil(16) - shared / 16;
    assert!(used_b <= own_b + 1, "beta used {used_b} blocks, its suffix needs {own_b}; alpha used {used_a}");
    assert!(used_b * 4 < used_a, "one copy of the system prompt: alpha {used_a}, beta {used_b}");
    // An anonymous repeat reuses the prefix through the same index.
    let (_, _, _, uc) = collect(f.handle.blocking_submit(f.request(None, &qa, 4)).unwrap());
    assert!(uc.cached_hot_tokens >= shared);
    f.handle.shutdown();
}

#[test]
fn cancelling_mid_prefill_and_mid_decode_frees_every_block() {
    let f = start(64, 32);
    let free0 = f.handle.blocking_stats().unwrap().free_blocks;
    // Mid-prefill: a long prompt in 32-token chunks, dropped after submit.
    let long = vec![ChatMessage::user("word ".repeat(600))];
    let s = f.handle.blocking_submit(f.request(None, &long, 8)).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    drop(s);
    // Mid-decode: drop after the first tokens.
    let mut s = f.handle.blocking_submit(f.request(None, &question(2), 200)).unwrap();
    for _ in 0..3 {
        assert!(matches!(s.blocking_next(), Some(TokenEvent::Token { .. })));
    }
    drop(s);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let st = f.handle.blocking_stats().unwrap();
        if st.running + st.waiting == 0 && st.free_blocks == free0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "blocks not returned: {st:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    f.handle.shutdown();
}

#[test]
fn a_pool_far_too_small_still_serves_everyone_correctly() {
    // 2 MiB = 5 blocks of 16 tokens: about one sequence at a time.
    let f = start(2, 512);
    let reqs: Vec<Vec<ChatMessage>> = (0..4).map(question).collect();
    let solo: Vec<Vec<u32>> = {
        let g = start(64, 512);
        let out = reqs.iter().map(|m| collect(g.handle.blocking_submit(g.request(None, m, 12)).unwrap()).0).collect();
        g.handle.shutdown();
        out
    };
    let streams: Vec<TokenStream> = reqs
        .iter()
        .enumerate()
        .map(|(i, m)| f.handle.blocking_submit(f.request(Some(&format!("a{i}")), m, 12)).unwrap())
        .collect();
    for (i, s) in streams.into_iter().enumerate() {
        assert_eq!(collect(s).0, solo[i], "request {i}");
    }
    let st = f.handle.blocking_stats().unwrap();
    assert!(st.evictions + st.preemptions > 0, "the pool forced evictions: {st:?}");
    assert_eq!(st.running + st.waiting, 0);
    // Every block is free or held by an agent cache (no leak).
    let held: usize = f.handle_agents_bytes() / st.block_bytes;
    assert_eq!(st.free_blocks + held, st.pool_blocks, "{st:?}");
    f.handle.shutdown();
}

#[test]
fn bad_requests_are_refused_at_once() {
    let f = start(2, 512);
    let mut r = f.request(None, &question(0), 8);
    r.prompt.clear();
    assert!(f.handle.blocking_submit(r).is_err());
    let mut r = f.request(None, &question(0), 8);
    r.prompt = vec![1; 9000];
    let e = f.handle.blocking_submit(r).err().unwrap().to_string();
    assert!(e.contains("context"), "{e}");
    let r = f.request(None, &question(0), 4000);
    let e = f.handle.blocking_submit(r).err().unwrap().to_string();
    assert!(e.contains("--kv-pool-mb"), "{e}");
    let _ = RequestId(0);
    f.handle.shutdown();
}

trait AgentsBytes {
    fn handle_agents_bytes(&self) -> usize;
}

impl AgentsBytes for Fixture {
    fn handle_agents_bytes(&self) -> usize {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(self.handle.agents()).unwrap().iter().map(|a| a.bytes).sum()
    }
}
