//! The CLI's answers to bad input: a one-line error naming the culprit, exit 2.

use std::process::Command;

use candle_core::quantized::gguf_file::{self, Value};

fn semantic(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_semantic")).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn one_line_error(stderr: &str, must_contain: &str) {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected: {stderr:?}");
    assert!(lines[0].starts_with("error: ") && lines[0].contains(must_contain), "{stderr:?} lacks {must_contain:?}");
}

#[test]
fn bad_models_and_arguments_exit_2_with_one_line() {
    let dir = std::env::temp_dir().join(format!("semantic-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let missing = dir.join("missing.gguf");
    let (code, err) = semantic(&["generate", "--prompt", "hi", "--model", missing.to_str().unwrap()]);
    assert_eq!(code, 2);
    one_line_error(&err, "missing.gguf");

    let text = dir.join("notes.txt");
    std::fs::write(&text, "just some text").unwrap();
    let (code, err) = semantic(&["generate", "--prompt", "hi", "--model", text.to_str().unwrap()]);
    assert_eq!(code, 2);
    one_line_error(&err, "not a GGUF file");

    let gpt2 = dir.join("gpt2.gguf");
    let arch = Value::String("gpt2".into());
    gguf_file::write(&mut std::fs::File::create(&gpt2).unwrap(), &[("general.architecture", &arch)], &[]).unwrap();
    let (code, err) = semantic(&["generate", "--prompt", "hi", "--model", gpt2.to_str().unwrap()]);
    assert_eq!(code, 2);
    one_line_error(&err, "unsupported architecture `gpt2`");

    let (code, err) = semantic(&["generate", "--prompt", "hi", "--temperature=-1", "--model", gpt2.to_str().unwrap()]);
    assert_eq!(code, 2);
    one_line_error(&err, "`temperature`");

    std::fs::remove_dir_all(&dir).ok();
}
