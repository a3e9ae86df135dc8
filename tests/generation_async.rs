//! The async stream (feature `async`): same events as the blocking iterator, and dropping or
//! cancelling it stops the generation within one token.
#![cfg(feature = "async")]

mod common;

use std::time::Duration;

use metal_candle::generation::{Event, FinishReason, GenerateParams, Generator};

fn qwen2() -> Generator {
    Generator::from_loaded(&common::load_cpu(&common::model_dir("qwen2"))).unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().build().unwrap()
}

#[test]
fn async_stream_matches_the_iterator() {
    let g = qwen2();
    let params = GenerateParams { max_tokens: 12, ignore_eos: true, ..GenerateParams::default() };
    let expected: Vec<Event> = g.stream("Hello", &params).unwrap().map(Result::unwrap).collect();
    let got = runtime().block_on(async {
        let mut s = g.stream_async("Hello", &params).unwrap();
        let mut events = Vec::new();
        while let Some(e) = s.next().await {
            events.push(e.unwrap());
        }
        events
    });
    assert_eq!(got.len(), expected.len());
    for (a, b) in got.iter().zip(&expected) {
        match (a, b) {
            (Event::Token { id: x, text: tx, .. }, Event::Token { id: y, text: ty, .. }) => assert_eq!((x, tx), (y, ty)),
            (Event::Finished(x), Event::Finished(y)) => assert_eq!((x.reason, &x.text), (y.reason, &y.text)),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn cancelling_or_dropping_stops_within_one_token() {
    let g = qwen2();
    let params = GenerateParams { max_tokens: 10_000, ignore_eos: true, ..GenerateParams::default() };
    let rt = runtime();
    rt.block_on(async {
        let mut s = g.stream_async("Hello", &params).unwrap();
        assert!(matches!(s.next().await, Some(Ok(Event::Token { .. }))));
        s.cancel_handle().cancel();
        let mut tokens_after = 0;
        let reason = loop {
            match s.next().await.unwrap().unwrap() {
                Event::Token { .. } => tokens_after += 1,
                Event::Finished(f) => break f.reason,
            }
        };
        assert_eq!(reason, FinishReason::Cancelled);
        // Events already buffered before the cancel may still arrive; no new token is computed.
        assert!(tokens_after <= 5, "{tokens_after}");

        let mut dropped = g.stream_async("Hello", &params).unwrap();
        let cancel = dropped.cancel_handle();
        assert!(dropped.next().await.is_some());
        drop(dropped);
        assert!(cancel.is_cancelled());
        tokio::task::yield_now().await;
    });
    // Dropping a runtime waits for its blocking threads: they stopped instead of running on for
    // 10 000 tokens.
    let started = std::time::Instant::now();
    drop(rt);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn outside_a_runtime_is_an_error() {
    let params = GenerateParams::default();
    assert!(matches!(qwen2().stream_async("Hi", &params), Err(metal_candle::Error::InvalidParameter { name: "runtime", .. })));
}

#[test]
fn engine_requests_stream_asynchronously() {
    let g = qwen2();
    let params = GenerateParams { max_tokens: 8, ignore_eos: true, ..GenerateParams::default() };
    let want = g.generate("Hello", &params).unwrap().tokens;
    let engine = metal_candle::engine::Engine::new(g, metal_candle::engine::EngineConfig::default()).unwrap();
    let ids = runtime().block_on(async {
        let mut s = engine.submit("Hello", &params).unwrap().into_async().unwrap();
        let mut ids = Vec::new();
        while let Some(e) = s.next().await {
            if let Event::Token { id, .. } = e.unwrap() {
                ids.push(id);
            }
        }
        ids
    });
    assert_eq!(ids, want);
}
