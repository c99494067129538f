//! The warm tier on the real model: write-behind, resume from disk in the
//! same process and after a restart, bad files, pins and the disk budget.

use std::path::{Path, PathBuf};
use std::time::Duration;

use semantic_core::{AgentId, SamplingParams};
use semantic_engine::{
    EngineConfig, EngineHandle, EngineRequest, KvCodec, ModelFingerprint, PersistConfig, Tier, TokenEvent, Usage,
};
use semantic_model::{paths, ChatMessage, ChatTemplate, GgufFile, LlamaModel, Tokenizer};

struct Fixture {
    handle: EngineHandle,
    tok: Tokenizer,
    tpl: ChatTemplate,
    rt: tokio::runtime::Runtime,
}

fn start(dir: Option<&Path>, budget: u64) -> Fixture {
    start_with(dir, budget, None)
}

fn start_with(dir: Option<&Path>, budget: u64, fail_after_bytes: Option<u64>) -> Fixture {
    start_full(dir, budget, fail_after_bytes, None)
}

fn start_full(dir: Option<&Path>, budget: u64, fail_after_bytes: Option<u64>, ttl: Option<Duration>) -> Fixture {
    let path = paths::test_model_path();
    let g = GgufFile::open(&path).unwrap();
    let model = LlamaModel::load(&g).unwrap();
    let tok = Tokenizer::from_gguf(g.content()).unwrap();
    let tpl = ChatTemplate::from_gguf(g.content(), &tok).unwrap();
    let persist = dir.map(|d| PersistConfig {
        dir: d.to_owned(),
        fingerprint: ModelFingerprint::new("b179c9523d0e6a0f").unwrap(),
        codec: KvCodec::F16,
        disk_budget_bytes: budget,
        ttl,
        fail_after_bytes,
    });
    let cfg = EngineConfig { kv_pool_bytes: 64 << 20, persist, ..EngineConfig::default() };
    let handle = EngineHandle::try_spawn(model, tok.clone(), "test".into(), cfg).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    Fixture { handle, tok, tpl, rt }
}

impl Fixture {
    fn ask(&self, agent: Option<&str>, msgs: &[ChatMessage]) -> (Vec<u32>, Usage) {
        let text = self.tpl.render(msgs, true, None).unwrap();
        let req = EngineRequest {
            id: self.handle.next_request_id(),
            agent: agent.map(|a| AgentId::new(a).unwrap()),
            prompt: self.tok.encode(&text).unwrap(),
            params: SamplingParams { max_tokens: 16, ..Default::default() },
            stop_ids: self.tpl.stop_token_ids(&self.tok),
            banned_ids: Vec::new(),
            logprobs: false,
        };
        let mut s = self.handle.blocking_submit(req).unwrap();
        let mut ids = Vec::new();
        loop {
            match s.blocking_next().unwrap() {
                TokenEvent::Token { id, .. } => ids.push(id),
                TokenEvent::Finished { usage, .. } => return (ids, usage),
                TokenEvent::Error(e) => panic!("{e}"),
            }
        }
    }

    /// Waits until the agent's file is written (write-behind).
    fn wait_saved(&self, agent: &str) {
        let id = AgentId::new(agent).unwrap();
        for _ in 0..500 {
            let info = self.rt.block_on(self.handle.agent(id.clone())).unwrap();
            if info.is_some_and(|i| i.disk_bytes > 0 && !i.dirty) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{agent} was never saved");
    }

    fn stop(self) {
        self.handle.shutdown();
    }
}

fn conversation(turn: usize) -> Vec<ChatMessage> {
    let mut m = vec![
        ChatMessage::system(format!("You review code. {}", "Be precise and kind. ".repeat(20))),
        ChatMessage::user("Is `let x = 5;` valid Rust?"),
    ];
    if turn > 0 {
        m.push(ChatMessage::assistant("Yes, it binds 5 to x."));
        m.push(ChatMessage::user("And `let mut y = x + 1;`?"));
    }
    m
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("semantic-persist-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn resume_from_disk_after_restart_equals_a_cold_run() {
    let dir = tempdir("restart");
    let cold = {
        let f = start(None, 1 << 30);
        let out = f.ask(Some("cold"), &conversation(1)).0;
        f.stop();
        out
    };
    let f = start(Some(&dir), 1 << 30);
    let (_, u) = f.ask(Some("reviewer"), &conversation(0));
    assert_eq!(u.cached_tokens(), 0);
    f.wait_saved("reviewer");
    f.stop();
    // A new engine (a restart) finds the file and skips the prefill.
    let f = start(Some(&dir), 1 << 30);
    let agents = f.rt.block_on(f.handle.agents()).unwrap();
    assert_eq!(agents.len(), 1);
    assert_eq!((agents[0].tier, agents[0].agent.as_str()), (Tier::Warm, "reviewer"));
    let (warm, u) = f.ask(Some("reviewer"), &conversation(1));
    assert!(u.cached_disk_tokens > 100, "{u:?}");
    assert_eq!(u.cached_hot_tokens, 0);
    assert_eq!(warm, cold, "f16 resume is token-identical to a cold run");
    f.stop();
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn evicted_agents_come_back_from_disk_and_shutdown_flushes() {
    let dir = tempdir("evict");
    let f = start(Some(&dir), 1 << 30);
    let (first, _) = f.ask(Some("planner"), &conversation(0));
    f.wait_saved("planner");
    let evicted = f.rt.block_on(f.handle.delete_agent_with(AgentId::new("planner").unwrap(), true)).unwrap();
    assert!(evicted);
    let info = f.rt.block_on(f.handle.agent(AgentId::new("planner").unwrap())).unwrap().unwrap();
    assert_eq!(info.tier, Tier::Warm);
    let (again, u) = f.ask(Some("planner"), &conversation(0));
    assert_eq!(again, first);
    assert!(u.cached_disk_tokens > 100, "{u:?}");
    let info = f.rt.block_on(f.handle.agent(AgentId::new("planner").unwrap())).unwrap().unwrap();
    assert!(info.io.last_load.is_some() && info.io.last_save.is_some(), "{info:?}");
    assert!(info.io.last_save_engine_max.is_some(), "{info:?}");
    // A dirty agent is written at shutdown even if the write-behind is late.
    let _ = f.ask(Some("late"), &conversation(0));
    f.stop();
    let f = start(Some(&dir), 1 << 30);
    let names: Vec<String> = f.rt.block_on(f.handle.agents()).unwrap().iter().map(|a| a.agent.to_string()).collect();
    assert_eq!(names, ["late", "planner"]);
    // Full delete removes the file too.
    assert!(f.rt.block_on(f.handle.delete_agent(AgentId::new("late").unwrap())).unwrap());
    assert!(f.rt.block_on(f.handle.agent(AgentId::new("late").unwrap())).unwrap().is_none());
    f.stop();
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_corrupt_file_is_quarantined_and_served_cold_with_the_right_answer() {
    let dir = tempdir("corrupt");
    let f = start(Some(&dir), 1 << 30);
    let (good, _) = f.ask(Some("victim"), &conversation(0));
    f.wait_saved("victim");
    f.stop();
    let file = dir.join("b179c9523d0e6a0f").join("victim.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes[n - 1000] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    let f = start(Some(&dir), 1 << 30);
    let (again, u) = f.ask(Some("victim"), &conversation(0));
    assert_eq!(u.cached_disk_tokens, 0, "the corrupt file is a miss");
    assert_eq!(again, good);
    assert!(!file.exists() || std::fs::read(&file).unwrap() != bytes, "the bad file left its place");
    assert!(dir.join("quarantine").exists(), "moved to quarantine/");
    f.stop();
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_disk_budget_drops_least_recently_used_files_but_never_pinned_ones() {
    let dir = tempdir("budget");
    // Each file is about 5 MB (~230 tokens); the budget holds two.
    let f = start(Some(&dir), 11 << 20);
    f.ask(Some("a1"), &conversation(0));
    f.wait_saved("a1");
    assert!(f.rt.block_on(f.handle.set_pinned(AgentId::new("a1").unwrap(), true)).unwrap());
    // An agent with neither a cache nor a pin is not found either way.
    for pin in [true, false] {
        assert!(!f.rt.block_on(f.handle.set_pinned(AgentId::new("nobody").unwrap(), pin)).unwrap());
    }
    for a in ["a2", "a3", "a4"] {
        f.ask(Some(a), &conversation(0));
        f.wait_saved(a);
    }
    let on_disk: Vec<(String, bool)> =
        f.rt.block_on(f.handle.agents())
            .unwrap()
            .iter()
            .filter(|a| a.disk_bytes > 0)
            .map(|a| (a.agent.to_string(), a.pinned))
            .collect();
    assert!(on_disk.contains(&("a1".into(), true)), "pinned survives: {on_disk:?}");
    assert!(on_disk.iter().any(|(a, _)| a == "a4"), "newest survives: {on_disk:?}");
    assert!(!on_disk.iter().any(|(a, _)| a == "a2"), "oldest unpinned goes: {on_disk:?}");
    f.stop();
    // Pins survive a restart.
    let f = start(Some(&dir), 11 << 20);
    let a1 = f.rt.block_on(f.handle.agent(AgentId::new("a1").unwrap())).unwrap().unwrap();
    assert!(a1.pinned);
    f.stop();
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_full_disk_loses_no_answer_and_leaves_no_partial_file() {
    let dir = tempdir("full");
    let f = start_with(Some(&dir), 1 << 30, Some(64 << 10));
    let (ids, _) = f.ask(Some("writer"), &conversation(0));
    assert!(!ids.is_empty(), "the request is answered");
    for _ in 0..300 {
        if f.handle.blocking_stats().unwrap().save_errors > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = f.handle.blocking_stats().unwrap();
    assert!(st.save_errors > 0, "the failed save is counted: {st:?}");
    assert_eq!(st.warm_agents, 0);
    let files: Vec<_> =
        std::fs::read_dir(dir.join("b179c9523d0e6a0f")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(files.iter().all(|n| !n.to_string_lossy().contains(".safetensors")), "no partial file: {files:?}");
    // The agent still works from RAM.
    let (again, u) = f.ask(Some("writer"), &conversation(0));
    assert_eq!(again, ids);
    assert!(u.cached_hot_tokens > 100);
    f.stop();
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn files_unused_past_the_ttl_expire_unless_pinned() {
    let dir = tempdir("ttl");
    let f = start(Some(&dir), 1 << 30);
    for a in ["keep", "drop"] {
        f.ask(Some(a), &conversation(0));
        f.wait_saved(a);
    }
    assert!(f.rt.block_on(f.handle.set_pinned(AgentId::new("keep").unwrap(), true)).unwrap());
    f.stop();
    std::thread::sleep(Duration::from_millis(20));
    let f = start_full(Some(&dir), 1 << 30, None, Some(Duration::from_millis(10)));
    let mut names = Vec::new();
    for _ in 0..3 {
        names = f.rt.block_on(f.handle.agents()).unwrap().iter().map(|a| a.agent.to_string()).collect();
    }
    assert_eq!(names, ["keep"]);
    assert!(!dir.join("b179c9523d0e6a0f/drop.safetensors").exists());
    f.stop();
    // An idle server expires files on its own (nothing asks it anything).
    let f = start_full(Some(&dir), 1 << 30, None, Some(Duration::from_millis(500)));
    f.ask(Some("idle"), &conversation(0));
    f.wait_saved("idle");
    let idle = dir.join("b179c9523d0e6a0f/idle.safetensors");
    assert!(idle.exists());
    let t0 = std::time::Instant::now();
    while idle.exists() && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!idle.exists(), "an idle server kept a file past its TTL");
    assert!(t0.elapsed() >= Duration::from_millis(300), "expired too early: {:?}", t0.elapsed());
    assert!(dir.join("b179c9523d0e6a0f/keep.safetensors").exists(), "a pinned file expired");
    f.stop();
    std::fs::remove_dir_all(&dir).ok();
}

/// Agents deleted right after their requests (their saves queued or being
/// written) leave no file once the disk tier is idle, and none lands after
/// that: the persister calls their saves off.
#[test]
fn deleting_agents_with_saves_in_flight_leaves_no_file() {
    let dir = tempdir("delete-in-flight");
    let f = start(Some(&dir), 1 << 30);
    let files = || -> Vec<PathBuf> {
        std::fs::read_dir(dir.join("b179c9523d0e6a0f"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    for i in 0..12 {
        let a = format!("gone-{i}");
        f.ask(Some(&a), &conversation(0));
        f.ask(Some(&a), &conversation(1));
        assert!(f.rt.block_on(f.handle.delete_agent(AgentId::new(&a).unwrap())).unwrap());
    }
    for _ in 0..500 {
        if f.rt.block_on(f.handle.stats()).unwrap().saves_in_flight == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(f.rt.block_on(f.handle.stats()).unwrap().saves_in_flight, 0);
    assert!(files().is_empty(), "{:?}", files());
    std::thread::sleep(Duration::from_millis(200));
    assert!(files().is_empty(), "a file landed later: {:?}", files());
    assert!(f.rt.block_on(f.handle.agents()).unwrap().is_empty());
    f.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
