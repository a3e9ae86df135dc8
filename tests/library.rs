//! The model library (registry, names, add/rm), the context probe's search over a fake model, and
//! the real probe of SmolLM2 through the CLI.

mod common;

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use metal_candle::library::passkey::{passkey_prompt, ANSWER_TOKENS};
use metal_candle::library::probe::{max_trials, resolution, search};
use metal_candle::library::{
    AddOptions, ContextTrial, LibraryConfig, LimitFactor, ModelLibrary, ProbePlan, SearchOutcome, SortKey, Trial,
};
use metal_candle::{Error, Result};

fn library(home: &Path) -> ModelLibrary {
    ModelLibrary::open(&LibraryConfig { home: home.to_path_buf(), hf_cache: None })
}

/// A Hugging Face Hub cache as `huggingface_hub` lays it out (snapshot files are symlinks into
/// `blobs/`, `refs/main` names the snapshot): `org/tiny` (an HF directory: the llama2 fixture's
/// config, weights and tokenizer), `org/tiny-GGUF` with two GGUF files, an older snapshot of
/// `org/tiny` that must not be picked, and `org/junk` (a README only).
#[cfg(unix)]
fn fake_hf_cache(root: &Path) -> PathBuf {
    use std::os::unix::fs::symlink;
    let cache = root.join("hf-hub");
    let put = |repo: &str, commit: &str, files: &[(&str, PathBuf)], main: bool| {
        let dir = cache.join(format!("models--{}", repo.replace('/', "--")));
        let snap = dir.join("snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(dir.join("blobs")).unwrap();
        for (i, (name, src)) in files.iter().enumerate() {
            let blob = dir.join("blobs").join(format!("{commit}{i}"));
            std::fs::copy(src, &blob).unwrap();
            symlink(&blob, snap.join(name)).unwrap();
        }
        if main {
            std::fs::create_dir_all(dir.join("refs")).unwrap();
            std::fs::write(dir.join("refs/main"), commit).unwrap();
        }
    };
    let l2 = fixture("llama2");
    put("org/tiny", "old", &[("config.json", l2.join("config.json"))], false);
    put("org/tiny", "abc123", &[("config.json", l2.join("config.json")), ("model.safetensors", l2.join("model.safetensors")), ("tokenizer.json", l2.join("tokenizer.json"))], true);
    put("org/tiny-GGUF", "def", &[("tiny-q8_0.gguf", l2.join("model-q8_0.gguf")), ("tiny-f16.gguf", l2.join("model-f16.gguf"))], true);
    let readme = root.join("README.md");
    std::fs::write(&readme, "not a model").unwrap();
    put("org/junk", "j", &[("README.md", readme)], true);
    cache
}

fn fixture(rel: &str) -> PathBuf {
    common::model_dir(rel)
}

/// Passes every length below `fails_at`; memory is `bytes_per_token` per token.
struct Fake {
    fails_at: usize,
    bytes_per_token: u64,
    runs: Vec<usize>,
}

impl Fake {
    fn new(fails_at: usize) -> Self {
        Self { fails_at, bytes_per_token: 1000, runs: Vec::new() }
    }
}

impl ContextTrial for Fake {
    fn memory_needed(&self, length: usize) -> u64 {
        length as u64 * self.bytes_per_token
    }

    fn run(&mut self, length: usize) -> Result<Trial> {
        self.runs.push(length);
        Ok(Trial { length, passed: length < self.fails_at, seconds: 0.0, peak_rss: None, error: None })
    }
}

fn plan(declared: usize, threshold: usize, min: usize) -> ProbePlan {
    ProbePlan { declared, threshold, min, max_memory: None }
}

fn probe(fake: &mut Fake, plan: &ProbePlan) -> SearchOutcome {
    search(fake, plan, &[], &mut |_| Ok(())).unwrap()
}

#[test]
fn search_finds_the_failure_length_within_the_resolution_in_few_trials() {
    for (declared, threshold) in [(8192, 102_400), (131_072, 102_400), (32_768, 4096), (4096, 4096)] {
        let p = plan(declared, threshold, 512);
        let cap = threshold.min(declared);
        for fails_at in [513, 600, 1000, 1500, 2047, 2048, 3000, cap / 2, cap - 1, cap] {
            let mut fake = Fake::new(fails_at);
            let out = probe(&mut fake, &p);
            let tested = out.tested.unwrap();
            let failure = out.first_failure.unwrap();
            assert!(tested < fails_at && fails_at <= failure, "{declared}/{threshold}/{fails_at}: {out:?}");
            assert!(failure - tested <= resolution(cap), "{fails_at}: {out:?}");
            assert!(fake.runs.len() <= max_trials(cap, 512), "{fails_at}: {} trials {:?}", fake.runs.len(), fake.runs);
            assert!(fake.runs.iter().all(|&l| (512..=cap).contains(&l)), "{:?}", fake.runs);
            assert_eq!(out.limit_factor, LimitFactor::Quality);
            assert_eq!(out.trials_run, fake.runs.len());
        }
    }
}

#[test]
fn a_pass_at_the_first_attempt_ends_the_probe() {
    let mut fake = Fake::new(usize::MAX);
    let out = probe(&mut fake, &plan(8192, 102_400, 512));
    assert_eq!((out.tested, out.first_failure, out.limit_factor), (Some(8192), None, LimitFactor::Declared));
    assert_eq!(fake.runs, [8192]);

    let mut fake = Fake::new(usize::MAX);
    let out = probe(&mut fake, &plan(131_072, 2048, 512));
    assert_eq!((out.tested, out.limit_factor), (Some(2048), LimitFactor::Threshold));
    assert_eq!(fake.runs, [2048], "never above the threshold");
}

#[test]
fn a_failure_at_min_means_no_usable_context() {
    let mut fake = Fake::new(100);
    let out = probe(&mut fake, &plan(8192, 8192, 512));
    assert_eq!((out.tested, out.first_failure, out.limit_factor), (None, Some(512), LimitFactor::Quality));
    assert_eq!(fake.runs, [8192, 512]);
}

#[test]
fn lengths_that_do_not_fit_in_memory_are_skipped() {
    // 1000 bytes per token, 3 MB: nothing above 3000 tokens may run.
    let p = ProbePlan { max_memory: Some(3_000_000), ..plan(8192, 102_400, 512) };
    let mut fake = Fake::new(usize::MAX);
    let out = probe(&mut fake, &p);
    assert_eq!((out.tested, out.limit_factor, out.cap), (Some(3000), LimitFactor::Memory, 3000));
    assert_eq!(fake.runs, [3000]);

    let mut fake = Fake::new(2000);
    let out = probe(&mut fake, &p);
    assert!(fake.runs.iter().all(|&l| l <= 3000), "{:?}", fake.runs);
    assert_eq!(out.limit_factor, LimitFactor::Quality);
    assert!(out.first_failure.unwrap() >= 2000 && out.tested.unwrap() < 2000);

    let mut fake = Fake::new(usize::MAX);
    let out = probe(&mut fake, &ProbePlan { max_memory: Some(100_000), ..p });
    assert_eq!((out.tested, out.limit_factor), (None, LimitFactor::Memory));
    assert!(fake.runs.is_empty(), "not even min fits: no trial");
}

#[test]
fn bad_plans_are_parameter_errors() {
    let mut fake = Fake::new(1000);
    for p in [plan(8192, 4096, 0), plan(8192, 4096, 5000), plan(1024, 4096, 2000)] {
        let err = search(&mut fake, &p, &[], &mut |_| Ok(())).unwrap_err();
        assert!(matches!(err, Error::InvalidParameter { name: "min", .. }), "{err}");
    }
    assert!(fake.runs.is_empty());
}

/// A probe interrupted after two trials (its recorder fails, as a killed process would stop)
/// resumes from the registry: the trials already run are not run again, and the result is the
/// one an uninterrupted probe finds.
#[test]
fn an_interrupted_probe_resumes_from_the_registry() {
    let home = tempfile::tempdir().unwrap();
    let lib = library(home.path());
    lib.add(&fixture("llama3/model-q4_0.gguf"), &AddOptions { name: Some("tiny".into()), copy: false }).unwrap();
    let p = plan(100_000, 100_000, 512);

    let mut whole = Fake::new(37_000);
    let expected = probe(&mut whole, &p);

    let mut first = Fake::new(37_000);
    let recorded = RefCell::new(0);
    let interrupted = search(&mut first, &p, &[], &mut |t| {
        if *recorded.borrow() == 2 {
            return Err(Error::EngineStopped);
        }
        lib.record_trial("tiny", t)?;
        *recorded.borrow_mut() += 1;
        Ok(())
    });
    assert!(interrupted.is_err());
    let history = lib.get("tiny").unwrap().probe.trials;
    assert_eq!(history.len(), 2);
    assert!(lib.get("tiny").unwrap().probe.result.is_none());

    let mut second = Fake::new(37_000);
    let resumed = search(&mut second, &p, &history, &mut |t| lib.record_trial("tiny", t)).unwrap();
    assert_eq!((resumed.tested, resumed.first_failure), (expected.tested, expected.first_failure));
    assert!(second.runs.iter().all(|l| !history.iter().any(|t| t.length == *l)), "reran {:?}", second.runs);
    assert_eq!(history.len() + second.runs.len(), whole.runs.len());
    assert_eq!(lib.get("tiny").unwrap().probe.trials.len(), whole.runs.len());
}

/// A registry as a crash leaves it: trials but no result, and a half-written temporary file.
#[test]
fn a_half_written_registry_resumes_and_a_stray_temp_file_is_ignored() {
    let home = tempfile::tempdir().unwrap();
    let lib = library(home.path());
    lib.add(&fixture("llama3/model-q4_0.gguf"), &AddOptions { name: Some("tiny".into()), copy: false }).unwrap();
    let text = std::fs::read_to_string(lib.registry_path()).unwrap();
    let text = text.replace("\"trials\": []", "\"trials\": [{\"length\": 8192, \"passed\": false, \"seconds\": 1.5, \"peak_rss\": null}]");
    std::fs::write(lib.registry_path(), text).unwrap();
    std::fs::write(home.path().join("registry.json.tmp-99999"), "{\"version\": 1, \"mod").unwrap();

    let history = lib.get("tiny").unwrap().probe.trials;
    assert_eq!(history.len(), 1);
    let mut fake = Fake::new(3000);
    let out = search(&mut fake, &plan(8192, 102_400, 512), &history, &mut |t| lib.record_trial("tiny", t)).unwrap();
    assert!(!fake.runs.contains(&8192), "the failed 8192 is known: {:?}", fake.runs);
    assert_eq!(out.first_failure.map(|f| f >= 3000), Some(true));
}

#[test]
fn writes_are_atomic_and_leave_no_temporary_files() {
    let home = tempfile::tempdir().unwrap();
    let lib = library(&home.path().join("not/yet"));
    assert!(lib.list(SortKey::Name).unwrap().is_empty(), "a missing registry is an empty library");
    lib.add(&fixture("llama3/model-q4_0.gguf"), &AddOptions::default()).unwrap();
    for i in 0..5 {
        let t = Trial { length: 512 * (i + 1), passed: true, seconds: 0.1, peak_rss: Some(1), error: None };
        lib.record_trial("model-q4_0", &t).unwrap();
    }
    let names: Vec<String> = std::fs::read_dir(lib.home()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["registry.json"]);
    assert_eq!(lib.get("model-q4_0").unwrap().probe.trials.len(), 5);
}

#[test]
fn a_corrupt_registry_is_an_error_naming_the_file_and_line_and_is_never_reset() {
    let home = tempfile::tempdir().unwrap();
    let lib = library(home.path());
    let broken = "{\n  \"version\": 1,\n  \"models\": [\n    {\"name\": \"x\",, }\n  ]\n}\n";
    std::fs::write(lib.registry_path(), broken).unwrap();
    let err = lib.list(SortKey::Name).unwrap_err();
    match &err {
        Error::CorruptRegistry { path, line, .. } => {
            assert_eq!(path, &lib.registry_path());
            assert_eq!(*line, 4);
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("registry.json:4:"), "{err}");
    let added = lib.add(&fixture("llama3/model-q4_0.gguf"), &AddOptions::default());
    assert!(matches!(added, Err(Error::CorruptRegistry { .. })));
    assert_eq!(std::fs::read_to_string(lib.registry_path()).unwrap(), broken, "left as it was");

    std::fs::write(lib.registry_path(), "{\"version\": 1, \"models\": [{\"name\": 3}]}").unwrap();
    assert!(matches!(lib.list(SortKey::Name), Err(Error::CorruptRegistry { line: 1, .. })));
    std::fs::write(lib.registry_path(), "{\"version\": 99, \"models\": []}").unwrap();
    let err = lib.list(SortKey::Name).unwrap_err();
    assert!(err.to_string().contains("newer"), "{err}");
}

#[test]
#[cfg(unix)]
fn the_hf_hub_cache_is_listed_by_repo_id_and_adopted_on_first_use() {
    let dir = tempfile::tempdir().unwrap();
    let cache = fake_hf_cache(dir.path());
    let lib = ModelLibrary::open(&LibraryConfig { home: dir.path().join("home"), hf_cache: Some(cache.clone()) });
    let listed = lib.list(SortKey::Name).unwrap();
    let names: Vec<&str> = listed.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["org/tiny", "org/tiny-GGUF:tiny-f16", "org/tiny-GGUF:tiny-q8_0"]);
    assert!(listed.iter().all(|e| e.hf_cache && !e.copied));
    let tiny = &listed[0];
    assert!(tiny.path.ends_with("models--org--tiny/snapshots/abc123"), "refs/main's snapshot: {}", tiny.path.display());
    assert_eq!(tiny.facts.format, "safetensors");
    assert_eq!(tiny.facts.tokenizer, "tokenizer.json");
    assert!(listed[1].facts.quant_mix.get("F16").copied().unwrap_or(0) > 0, "{:?}", listed[1].facts.quant_mix);
    let skipped = lib.hf_cache_skipped();
    assert!(skipped.iter().any(|s| s.path.ends_with("models--org--junk")), "{skipped:?}");
    // Nothing is written by listing; a name resolves to the snapshot and is recorded.
    assert!(lib.registry().unwrap().models.is_empty());
    assert_eq!(lib.resolve(Path::new("org/tiny")).unwrap(), tiny.path);
    let registry = lib.registry().unwrap();
    assert_eq!(registry.models.len(), 1);
    assert!(registry.models[0].hf_cache && registry.models[0].last_used.is_some());
    assert_eq!(lib.list(SortKey::Name).unwrap().len(), 3, "an adopted model is listed once");
    // The loader takes the snapshot (symlinks into blobs) as any HF directory.
    let loaded = common::load_cpu(&lib.resolve(Path::new("org/tiny-GGUF:tiny-q8_0")).unwrap());
    assert_eq!(loaded.model.config().num_hidden_layers, tiny.facts.num_layers);
    // A probe trial adopts the model it is recorded for.
    let trial = Trial { length: 256, passed: true, seconds: 1.0, peak_rss: None, error: None };
    lib.record_trial("org/tiny-GGUF:tiny-f16", &trial).unwrap();
    assert_eq!(lib.get("org/tiny-GGUF:tiny-f16").unwrap().probe.trials, [trial]);
    // The library never deletes from the cache; rm of an adopted entry only forgets it.
    match lib.remove("org/junk") {
        Err(Error::ModelNotFound { available, .. }) => assert!(available.contains(&"org/tiny-GGUF:tiny-q8_0".to_string()), "{available:?}"),
        other => panic!("{other:?}"),
    }
    let removed = lib.remove("org/tiny").unwrap();
    assert!(removed.deleted.is_none());
    assert!(tiny.path.join("model.safetensors").is_file());
    assert!(lib.list(SortKey::Name).unwrap().iter().any(|e| e.name == "org/tiny"), "still in the cache, so still listed");
    let dir2 = tempfile::tempdir().unwrap();
    let lib2 = ModelLibrary::open(&LibraryConfig { home: dir2.path().to_path_buf(), hf_cache: Some(cache) });
    assert!(matches!(lib2.remove("org/tiny"), Err(Error::LibraryName { .. })), "a cache model that was never used is not the library's to remove");
    // A missing cache is an empty one.
    let lib3 = ModelLibrary::open(&LibraryConfig { home: dir2.path().to_path_buf(), hf_cache: Some(dir2.path().join("nope")) });
    assert!(lib3.list(SortKey::Name).unwrap().is_empty());
}

fn lora(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora").join(rel)
}

#[test]
fn adapters_are_known_by_name_with_their_facts_and_their_base() {
    let dir = tempfile::tempdir().unwrap();
    let lib = library(dir.path());
    lib.add(&fixture("qwen2"), &AddOptions { name: Some("q2".into()), copy: false }).unwrap();
    lib.add(&fixture("llama3/model-q8_0.gguf"), &AddOptions { name: Some("l3".into()), copy: false }).unwrap();
    // PEFT: rank, alpha, targets and base as adapter_config.json states them; matched to the
    // model whose directory its `base_model_name_or_path` names.
    let a = lib.add_adapter(&lora("qwen2/a"), &AddOptions { name: Some("qa".into()), copy: false }, None).unwrap();
    assert_eq!((a.facts.format.as_str(), a.facts.rank, a.facts.alpha, a.facts.rslora), ("peft", 4, 8.0, false));
    assert_eq!(a.facts.base_model.as_deref(), Some("tests/fixtures/models/qwen2"));
    let rs = lib.add_adapter(&lora("qwen2/rs"), &AddOptions { name: Some("qrs".into()), copy: true }, None).unwrap();
    assert!(rs.facts.rslora && rs.copied);
    // A GGUF adapter names no base path: --base ties it to a library model.
    let g = lib.add_adapter(&lora("llama3/a.gguf"), &AddOptions { name: Some("l3a".into()), copy: false }, Some("l3")).unwrap();
    assert_eq!(g.facts.format, "gguf");
    assert!(g.facts.rank > 0 && g.facts.targets.iter().any(|t| t == "attn_q"), "{:?}", g.facts);
    let names = |v: Vec<metal_candle::library::AdapterEntry>| v.into_iter().map(|a| a.name).collect::<Vec<_>>();
    assert_eq!(names(lib.adapters_for(&lib.get("q2").unwrap()).unwrap()), ["qa", "qrs"]);
    assert_eq!(names(lib.adapters_for(&lib.get("l3").unwrap()).unwrap()), ["l3a"]);
    // Names are shared by models and adapters; a base the library lacks is an error; so is a
    // malformed adapter.
    assert!(matches!(lib.add_adapter(&lora("qwen2/b"), &AddOptions { name: Some("q2".into()), copy: false }, None), Err(Error::LibraryName { .. })));
    assert!(matches!(lib.add(&fixture("llama2"), &AddOptions { name: Some("qa".into()), copy: false }), Err(Error::LibraryName { .. })));
    assert!(matches!(lib.add_adapter(&lora("qwen2/b"), &AddOptions { name: Some("qb".into()), copy: false }, Some("nope")), Err(Error::ModelNotFound { .. })));
    let broken = dir.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("adapter_config.json"), r#"{"r": 0, "lora_alpha": 8, "target_modules": ["q_proj"]}"#).unwrap();
    assert!(matches!(lib.add_adapter(&broken, &AddOptions::default(), None), Err(Error::Adapter { .. })));
    assert!(matches!(lib.add_adapter(&fixture("llama3/model-q8_0.gguf"), &AddOptions::default(), None), Err(Error::NotAModel { .. })), "a model is not an adapter");
    // Names resolve for --adapter; rm of a copied adapter deletes only its copy.
    assert_eq!(lib.resolve_adapter(Path::new("qa")).unwrap(), std::fs::canonicalize(lora("qwen2/a")).unwrap());
    assert!(matches!(lib.resolve_adapter(Path::new("zz")), Err(Error::NotAModel { .. })));
    let removed = lib.remove("qrs").unwrap();
    assert!(removed.deleted.as_ref().is_some_and(|d| d.starts_with(lib.models_dir())) && !rs.path.exists());
    assert!(lora("qwen2/rs/adapter_config.json").is_file());
    assert_eq!(lib.remove("qa").unwrap().deleted, None);
    assert!(lora("qwen2/a/adapter_config.json").is_file());
    assert_eq!(names(lib.adapters().unwrap()), ["l3a"]);
}

#[test]
fn show_reads_facts_from_headers() {
    let home = tempfile::tempdir().unwrap();
    let lib = library(home.path());
    let gguf = lib.add(&fixture("llama3/model-q4_0.gguf"), &AddOptions::default()).unwrap();
    assert_eq!(gguf.name, "model-q4_0");
    let f = &gguf.facts;
    assert_eq!((f.format.as_str(), f.architecture.as_str(), f.declared_context), ("gguf", "Llama", 128));
    assert!(f.quant_mix.contains_key("Q4_0"), "{:?}", f.quant_mix);
    assert_eq!(f.size_bytes, std::fs::metadata(fixture("llama3/model-q4_0.gguf")).unwrap().len());
    assert_eq!((f.num_layers, f.num_key_value_heads, f.head_dim), (2, 1, 16));

    let dir = lib.add(&fixture("llama3"), &AddOptions { name: Some("l3".into()), copy: false }).unwrap();
    let f = &dir.facts;
    assert_eq!((f.format.as_str(), f.tokenizer.as_str(), f.declared_context), ("safetensors", "tokenizer.json", 128));
    assert_eq!(f.quant_mix.keys().collect::<Vec<_>>(), ["F32"], "only model.safetensors counts");
    // 2 layers of (q 64·64, k 16·64, v 16·64, o 64·64, 3 MLP 128·64, 2 norms 64) + embed 400·64 + norm 64.
    assert_eq!(f.parameters, 2 * (64 * 64 * 2 + 16 * 64 * 2 + 3 * 128 * 64 + 2 * 64) + 400 * 64 + 64);
}

#[test]
fn names_are_ids_and_unique() {
    let home = tempfile::tempdir().unwrap();
    let lib = library(home.path());
    let gguf = fixture("llama3/model-q4_0.gguf");
    for bad in ["", "a/b", "../x", ".hidden", "-x", "sp ace"] {
        let err = lib.add(&gguf, &AddOptions { name: Some(bad.into()), copy: false }).unwrap_err();
        assert!(matches!(err, Error::LibraryName { .. }), "{bad}: {err}");
    }
    lib.add(&gguf, &AddOptions { name: Some("m".into()), copy: false }).unwrap();
    let err = lib.add(&fixture("qwen2/model-q4_0.gguf"), &AddOptions { name: Some("m".into()), copy: true }).unwrap_err();
    assert!(matches!(err, Error::LibraryName { .. }), "{err}");
    assert!(!lib.models_dir().join("m").exists(), "a refused copy leaves nothing behind");
    let err = lib.get("nope").unwrap_err();
    assert!(matches!(&err, Error::ModelNotFound { available, .. } if available == &["m"]), "{err}");
}

#[test]
fn names_resolve_to_paths_and_paths_pass_through() {
    let home = tempfile::tempdir().unwrap();
    let lib = library(home.path());
    let gguf = fixture("llama3/model-q4_0.gguf");
    lib.add(&gguf, &AddOptions { name: Some("tiny".into()), copy: false }).unwrap();
    assert_eq!(lib.resolve(&gguf).unwrap(), gguf);
    assert_eq!(lib.get("tiny").unwrap().last_used, None, "a path is not a use of an entry");
    assert_eq!(lib.resolve(Path::new("tiny")).unwrap(), std::fs::canonicalize(&gguf).unwrap());
    assert!(lib.get("tiny").unwrap().last_used.is_some());
    assert_eq!(lib.most_recent().unwrap().unwrap().name, "tiny");
    assert!(matches!(lib.resolve(Path::new("nope")), Err(Error::ModelNotFound { .. })));
    assert!(matches!(lib.resolve(Path::new("/no/such/model.gguf")), Err(Error::NotAModel { .. })), "a path stays a path");
    assert_eq!(lib.find_path(&gguf).unwrap().unwrap().name, "tiny");
}

#[test]
fn mark_used_records_a_use_by_path_only_for_library_models() {
    let home = tempfile::tempdir().unwrap();
    let lib = library(home.path());
    let (gguf, other) = (fixture("llama3/model-q4_0.gguf"), fixture("qwen2/model-q8_0.gguf"));
    assert_eq!(lib.mark_used(&gguf).unwrap(), None);
    assert!(!lib.registry_path().exists(), "nothing is written for an unknown path");
    lib.add(&gguf, &AddOptions { name: Some("tiny".into()), copy: false }).unwrap();
    lib.add(&other, &AddOptions { name: Some("other".into()), copy: false }).unwrap();
    assert_eq!(lib.most_recent().unwrap().unwrap().name, "other", "none used: the latest added");
    assert_eq!(lib.mark_used(&gguf).unwrap().as_deref(), Some("tiny"));
    assert!(lib.get("tiny").unwrap().last_used.is_some() && lib.get("other").unwrap().last_used.is_none());
    assert_eq!(lib.most_recent().unwrap().unwrap().name, "tiny");
}

#[test]
fn remove_deletes_only_copies_inside_the_library() {
    let home = tempfile::tempdir().unwrap();
    let lib = library(home.path());
    let outside = tempfile::tempdir().unwrap();
    let gguf = outside.path().join("tiny.gguf");
    std::fs::copy(fixture("llama3/model-q4_0.gguf"), &gguf).unwrap();

    lib.add(&gguf, &AddOptions::default()).unwrap();
    let removed = lib.remove("tiny").unwrap();
    assert_eq!(removed.deleted, None);
    assert!(gguf.is_file(), "a model added by path is never deleted");

    let copy = lib.add(&gguf, &AddOptions { name: Some("c".into()), copy: true }).unwrap();
    assert!(copy.copied && copy.path.starts_with(lib.models_dir()) && copy.path.is_file());
    let removed = lib.remove("c").unwrap();
    assert_eq!(removed.deleted, Some(std::fs::canonicalize(lib.models_dir()).unwrap().join("c")));
    assert!(!copy.path.exists() && gguf.is_file());

    // A registry edited to claim an outside file as a copy still cannot make rm delete it.
    lib.add(&gguf, &AddOptions { name: Some("forged".into()), copy: false }).unwrap();
    let text = std::fs::read_to_string(lib.registry_path()).unwrap().replace("\"copied\": false", "\"copied\": true");
    std::fs::write(lib.registry_path(), text).unwrap();
    assert_eq!(lib.remove("forged").unwrap().deleted, None);
    assert!(gguf.is_file());
    assert!(matches!(lib.remove("forged"), Err(Error::ModelNotFound { .. })));
}

#[test]
fn list_sorts_by_each_key() {
    let home = tempfile::tempdir().unwrap();
    let lib = library(home.path());
    lib.add(&fixture("llama3/model-q4_0.gguf"), &AddOptions { name: Some("b-small".into()), copy: false }).unwrap();
    lib.add(&fixture("llama3/model-f32.gguf"), &AddOptions { name: Some("a-big".into()), copy: false }).unwrap();
    lib.add(&fixture("qwen2/model-q8_0.gguf"), &AddOptions { name: Some("c-mid".into()), copy: false }).unwrap();
    let result = metal_candle::library::probe_result(128, &SearchOutcome { tested: Some(100), first_failure: None, limit_factor: LimitFactor::Declared, cap: 100, trials_run: 1 }, "test");
    lib.record_result("c-mid", &result).unwrap();
    let names = |k| lib.list(k).unwrap().into_iter().map(|e| e.name).collect::<Vec<_>>();
    assert_eq!(names(SortKey::Name), ["a-big", "b-small", "c-mid"]);
    assert_eq!(names(SortKey::Size), ["a-big", "c-mid", "b-small"]);
    assert_eq!(names(SortKey::Tested)[0], "c-mid");
    assert!("bogus".parse::<SortKey>().is_err());
}

#[test]
fn passkey_prompts_have_the_exact_length_and_hide_the_key_early() {
    let Some(path) = common::smollm2_path() else { return };
    let file = metal_candle::loader::gguf::GgufFile::open(&path).unwrap();
    let tok = metal_candle::Tokenizer::from_gguf(&file).unwrap();
    for len in [300, 1000, 4096 - ANSWER_TOKENS] {
        let (ids, key) = passkey_prompt(&tok, len, 7).unwrap();
        assert_eq!(ids.len(), len);
        let text = tok.decode(&ids, false).unwrap();
        let at = text.find(&key.to_string()).unwrap();
        assert!(at < text.len() / 10 + 300, "key at {at} of {}", text.len());
        assert!(text.trim_end().ends_with("The pass key is"));
        assert_eq!(passkey_prompt(&tok, len, 7).unwrap().1, key, "seeded");
    }
    assert!(matches!(passkey_prompt(&tok, 20, 7), Err(Error::InvalidParameter { .. })));
}

#[test]
fn the_memory_estimate_counts_weights_kv_cache_and_activations() {
    use metal_candle::library::passkey::memory_estimate;
    let facts = metal_candle::library::ModelFacts::read(&fixture("llama3/model-q4_0.gguf")).unwrap();
    let (a, b) = (memory_estimate(&facts, 1000, 4), memory_estimate(&facts, 2000, 4));
    assert!(a > facts.size_bytes, "weights are counted");
    // K and V per layer per kv head: 2 · 2 layers · 1 · 16 · 4 bytes = 256 bytes a token, plus
    // f32 activations (4·64 + 3·128 + (4 + 2)·16) · 4 = 2944 bytes a token.
    assert_eq!(b - a, 1000 * (256 + 2944));
    assert_eq!(memory_estimate(&facts, 1000, 2) + 1000 * 128, a, "the KV cache scales with the element size");
}

/// The binary as a user runs it (feature `cli`).
#[cfg(feature = "cli")]
mod cli {
    use std::process::{Command, Output, Stdio};

    use super::*;

    fn cli(home: &Path, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_metal-candle")).args(args).env("METAL_CANDLE_HOME", home).env("HF_HUB_CACHE", home.join("hf-hub")).stdin(Stdio::null()).output().unwrap()
    }

    fn ok(out: Output) -> String {
        assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn models_cli_adds_lists_shows_and_removes() {
        let home = tempfile::tempdir().unwrap();
        let h = home.path();
        let gguf = fixture("llama3/model-q4_0.gguf");
        ok(cli(h, &["models", "add", gguf.to_str().unwrap(), "--name", "tiny"]));
        ok(cli(h, &["models", "add", fixture("llama3").to_str().unwrap(), "--name", "tiny-hf", "--copy"]));
        assert_eq!(ok(cli(h, &["models", "list", "--show", "id"])), "tiny\ntiny-hf\n");
        assert_eq!(ok(cli(h, &["models", "list", "--show", "id", "--sort", "size"])), "tiny-hf\ntiny\n");
        let table = ok(cli(h, &["models", "list"]));
        assert!(table.starts_with("NAME") && table.contains("Q4_0"), "{table}");
        let json: serde_json::Value = serde_json::from_str(&ok(cli(h, &["models", "list", "--show", "json"]))).unwrap();
        assert_eq!(json[0]["facts"]["declared_context"], 128);
        let show = ok(cli(h, &["models", "show", "tiny"]));
        assert!(show.contains("declared context: 128") && show.contains("chat template:"), "{show}");

        // --all reports a model too short for --min and goes on; the command fails at the end.
        let out = cli(h, &["probe-context", "--all"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("error: tiny: invalid parameter `min`") && err.contains("not probed: tiny, tiny-hf"), "{err}");

        // rm asks; with no answer (stdin closed) nothing is removed.
        let out = ok(cli(h, &["models", "rm", "tiny-hf"]));
        assert!(out.contains("not removed"));
        let out = ok(cli(h, &["models", "rm", "tiny-hf", "--yes"]));
        assert!(out.contains("deleted"), "{out}");
        ok(cli(h, &["models", "rm", "tiny", "--yes"]));
        assert!(gguf.is_file());
        let out = cli(h, &["models", "show", "tiny"]);
        assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("does not exist"));

        std::fs::write(h.join("registry.json"), "{\n oops").unwrap();
        let out = cli(h, &["models", "list"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("registry.json:2:"), "{err}");
    }

    #[test]
    fn model_names_work_wherever_a_model_path_does() {
        let home = tempfile::tempdir().unwrap();
        let h = home.path();
        ok(cli(h, &["models", "add", fixture("llama3").to_str().unwrap(), "--name", "tiny"]));
        let out = ok(cli(h, &["generate", "--model", "tiny", "--prompt", "hello", "--max-tokens", "2", "--json"]));
        assert!(out.lines().last().unwrap().contains("finish_reason"), "{out}");
        let out = cli(h, &["generate", "--model", "missing", "--prompt", "hello"]);
        assert!(String::from_utf8_lossy(&out.stderr).contains("model `missing` does not exist; available: tiny"));
    }

    /// `models add` takes adapters; `show` lists them with their model; `--adapter NAME` applies
    /// one exactly as its path does.
    #[test]
    fn adapters_are_added_shown_and_applied_by_name() {
        let home = tempfile::tempdir().unwrap();
        let h = home.path();
        ok(cli(h, &["models", "add", fixture("qwen2").to_str().unwrap(), "--name", "q2"]));
        let out = ok(cli(h, &["models", "add", lora("qwen2/a").to_str().unwrap(), "--name", "sql"]));
        assert!(out.contains("added adapter sql") && out.contains("for q2"), "{out}");
        let shown = ok(cli(h, &["models", "show", "q2"]));
        assert!(shown.contains("adapters:         sql (peft r=4"), "{shown}");
        let shown = ok(cli(h, &["models", "show", "sql"]));
        assert!(shown.contains("LoRA adapter (peft)") && shown.contains("tests/fixtures/models/qwen2"), "{shown}");
        let table = ok(cli(h, &["models", "list"]));
        assert!(table.contains("ADAPTER") && table.lines().any(|l| l.starts_with("sql ") && l.contains(" q2 ")), "{table}");
        // The token lines (the last line carries timings).
        let tokens = |out: String| out.lines().filter(|l| l.starts_with("{\"token\"")).map(str::to_string).collect::<Vec<_>>();
        let gen = |adapter: &[&str]| tokens(ok(cli(h, &[&["generate", "--model", "q2", "--prompt", "hello", "--max-tokens", "12", "--temperature", "0", "--json"][..], adapter].concat())));
        let by_name = gen(&["--adapter", "sql:3"]);
        assert_eq!(by_name.len(), 12);
        assert_eq!(by_name, gen(&["--adapter", &format!("{}:3", lora("qwen2/a").display())]));
        assert_ne!(by_name, gen(&[]), "the adapter changes the output");
        let out = cli(h, &["models", "add", fixture("llama2").to_str().unwrap(), "--base", "q2"]);
        assert!(String::from_utf8_lossy(&out.stderr).contains("is a model, not an adapter"));
        let out = ok(cli(h, &["models", "rm", "sql", "--yes"]));
        assert!(out.contains("removed sql; its files stay"), "{out}");
    }

    /// Models of the Hugging Face Hub cache (`$HF_HUB_CACHE`) are listed and usable by repo id.
    #[test]
    #[cfg(unix)]
    fn hf_hub_cache_models_are_listed_and_run_by_repo_id() {
        let home = tempfile::tempdir().unwrap();
        let h = home.path();
        fake_hf_cache(h);
        let ids = ok(cli(h, &["models", "list", "--show", "id"]));
        assert_eq!(ids, "org/tiny\norg/tiny-GGUF:tiny-f16\norg/tiny-GGUF:tiny-q8_0\n");
        let table = ok(cli(h, &["models", "list"]));
        assert!(table.contains("org/tiny-GGUF:tiny-q8_0") && table.contains("hf-cache"), "{table}");
        let out = ok(cli(h, &["generate", "--model", "org/tiny-GGUF:tiny-q8_0", "--prompt", "hello", "--max-tokens", "2", "--json"]));
        assert!(out.lines().last().unwrap().contains("finish_reason"), "{out}");
        let shown = ok(cli(h, &["models", "show", "org/tiny"]));
        assert!(shown.contains("Hugging Face Hub cache"), "{shown}");
        let out = cli(h, &["models", "rm", "org/tiny", "--yes"]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("huggingface-cli delete-cache"), "{}", String::from_utf8_lossy(&out.stderr));
    }

    /// The real probe: SmolLM2 with `--threshold 2048` (one trial at 2048, ~15 s on two cores),
    /// persisted, reported by `models list`, and a rerun resumes without running it again.
    #[test]
    fn smollm2_probe_records_its_trials_and_list_reports_the_tested_context() {
        let Some(path) = common::smollm2_path() else { return };
        let home = tempfile::tempdir().unwrap();
        let h = home.path();
        ok(cli(h, &["models", "add", path.to_str().unwrap(), "--name", "smollm2"]));
        let out = ok(cli(h, &["probe-context", "--model", "smollm2", "--threshold", "2048", "--json"]));
        let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        assert_eq!(last["model"], "smollm2");
        assert_eq!(last["declared"], 8192);
        let trials = last["trials"].as_array().unwrap();
        assert!(!trials.is_empty() && trials.iter().all(|t| t["length"].as_u64().unwrap() <= 2048), "{last}");
        assert!(trials.iter().all(|t| t["seconds"].as_f64().unwrap() > 0.0 && t.get("peak_rss").is_some()));
        let tested = last["tested"].clone();
        assert!(tested.is_null() || tested.as_u64().unwrap() <= 2048);

        let list: serde_json::Value = serde_json::from_str(&ok(cli(h, &["models", "list", "--show", "json"]))).unwrap();
        assert_eq!(list[0]["tested_context"], tested);
        assert_eq!(list[0]["probe"]["trials"].as_array().unwrap().len(), trials.len());

        // --all probes every library model; this one's trials are stored, so nothing runs again.
        let again = cli(h, &["probe-context", "--all", "--threshold", "2048", "--json"]);
        let err = String::from_utf8_lossy(&again.stderr).into_owned();
        assert!(err.contains("(0 new trials)"), "{err}");
        let again: serde_json::Value = serde_json::from_str(ok(again).lines().last().unwrap()).unwrap();
        assert_eq!(again["tested"], tested);
        assert_eq!(again["trials"].as_array().unwrap().len(), trials.len());

        // A memory bound below the weights: no length fits, no trial runs, memory is the limit.
        let out = ok(cli(h, &["probe-context", "--model", "smollm2", "--threshold", "2048", "--max-memory", "1000000", "--json"]));
        let bounded: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        assert_eq!((bounded["tested"].clone(), bounded["limit_factor"].clone()), (serde_json::Value::Null, "memory".into()));
        assert_eq!(bounded["trials"].as_array().unwrap().len(), trials.len());
    }

    /// Starts `serve --ctx auto` for the library model `tiny` on a free port; returns its stderr
    /// up to the "listening on" line and the `context_length` /v1/models reports, then stops it.
    #[cfg(feature = "server")]
    fn serve_auto(home: &Path, extra: &[&str]) -> (String, u64) {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new(env!("CARGO_BIN_EXE_metal-candle"))
            .args(["serve", "--model", "tiny", "--ctx", "auto", "--port", "0", "--parallel", "2"])
            .args(extra)
            .env("METAL_CANDLE_HOME", home)
            .env("HF_HUB_CACHE", home.join("hf-hub"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut text = String::new();
            for line in BufReader::new(stderr).lines().map_while(std::result::Result::ok) {
                text.push_str(&line);
                text.push('\n');
                if let Some(at) = line.find("listening on http://") {
                    let _ = tx.send(Ok((text.clone(), line[at + "listening on ".len()..].trim().to_string())));
                }
            }
            let _ = tx.send(Err(text));
        });
        let got = rx.recv_timeout(std::time::Duration::from_secs(60));
        let result = match got {
            Ok(Ok((text, url))) => {
                // The model loads in the background after the listener is up; its context length
                // is reported once it is loaded.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
                let ctx = loop {
                    let models: serde_json::Value = reqwest::blocking::get(format!("{url}/v1/models")).unwrap().json().unwrap();
                    match models["data"][0]["context_length"].as_u64() {
                        Some(n) => break n,
                        None if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(100)),
                        None => break 0,
                    }
                };
                (text, ctx)
            }
            other => {
                let _ = child.kill();
                panic!("serve did not start: {other:?}");
            }
        };
        let _ = child.kill();
        let _ = child.wait();
        result
    }

    /// `serve --ctx auto`: the declared limit when nothing else binds, the tested one once a probe
    /// has recorded it (smaller), and the server runs with what it printed.
    #[cfg(feature = "server")]
    #[test]
    fn serve_ctx_auto_takes_the_smallest_of_declared_tested_and_memory() {
        let home = tempfile::tempdir().unwrap();
        let h = home.path();
        ok(cli(h, &["models", "add", fixture("llama3").to_str().unwrap(), "--name", "tiny"]));
        let declared = metal_candle::library::ModelFacts::read(&fixture("llama3")).unwrap().declared_context;
        let (err, ctx) = serve_auto(h, &[]);
        assert!(err.contains(&format!("--ctx auto: {declared} for tiny (limited by declared: declared {declared}, untested")), "{err}");
        assert_eq!(ctx, declared as u64, "{err}");
        let tested = declared / 2;
        let outcome = SearchOutcome { tested: Some(tested), first_failure: Some(tested + 8), limit_factor: LimitFactor::Quality, cap: declared, trials_run: 2 };
        library(h).record_result("tiny", &metal_candle::library::probe_result(declared, &outcome, "test")).unwrap();
        let (err, ctx) = serve_auto(h, &[]);
        assert!(err.contains(&format!("--ctx auto: {tested} for tiny (limited by tested: declared {declared}, tested {tested}")), "{err}");
        assert_eq!(ctx, tested as u64, "{err}");
        // A memory bound below the weights: a clear error naming the way out, no server.
        let out = cli(h, &["serve", "--model", "tiny", "--ctx", "auto", "--port", "0", "--max-memory", "1000"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("not even") && err.contains("--parallel") && !err.contains("listening"), "{err}");
        let out = cli(h, &["serve", "--model", "nope", "--ctx", "auto", "--port", "0"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("`nope`") && err.contains("tiny"), "{err}");
    }
}
