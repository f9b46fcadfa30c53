//! `lora train` end to end, as a user runs it: against a PyTorch + PEFT loop, the quickstart,
//! exact resume after an abrupt death and after Ctrl-C, and its errors.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{command, copy_files, fixture, lora, s, stderr, tensors};
use serde_json::Value;

/// The `metrics.jsonl` entries of a run.
fn metrics(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// `(step, loss)` of every entry that has `key`.
fn curve(dir: &Path, key: &str) -> Vec<(u64, f64)> {
    metrics(dir).iter().filter_map(|m| Some((m["step"].as_u64()?, m.get(key)?.as_f64()?))).collect()
}

/// The flags that reproduce `tests/fixtures/train_reference` (see its script), for `iters`
/// iterations, starting from PEFT's initial adapter or (`initial` false) a fresh one.
fn reference_flags(out: &Path, iters: usize, initial: bool) -> Vec<String> {
    let r = fixture("train_reference");
    let mut args: Vec<String> = [
        "train",
        "--model",
        s(&fixture("llama")),
        "--data",
        s(&r.join("data")),
        "--adapter-path",
        s(out),
        "--device",
        "cpu",
        "--num-layers",
        "-1",
        "--batch-size",
        "2",
        "--optimizer",
        "adamw",
        "--weight-decay",
        "0.01",
        "--learning-rate",
        "1e-2",
        "--lr-schedule",
        "cosine",
        "--warmup",
        "3",
        "--max-grad-norm",
        "1.0",
        "--shuffle",
        "false",
        "--steps-per-report",
        "1",
        "--save-every",
        "0",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    args.extend(["--iters".to_string(), iters.to_string()]);
    if initial {
        args.extend(["--resume-adapter-file".to_string(), s(&r.join("initial")).to_string()]);
    }
    args
}

/// Checks the run in `out` against the torch + PEFT run in fixture `reference`: every step's
/// loss and the final adapter's weights within `tol`. Returns the reference's losses.
fn assert_matches_reference(out: &Path, reference: &str, tol: f64) -> Vec<f64> {
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(fixture(reference).join("expected.json")).unwrap()).unwrap();
    let want: Vec<f64> = serde_json::from_value(expected["losses"].clone()).unwrap();
    let got = curve(out, "train_loss");
    assert_eq!(got.len(), want.len(), "one report per step");
    for ((step, loss), want) in got.iter().zip(&want) {
        assert!((loss - want).abs() < tol, "step {step}: {loss} vs {reference}'s {want}");
    }
    let ours = tensors(&out.join("adapter_model.safetensors"));
    let peft = tensors(&fixture(reference).join("final/adapter_model.safetensors"));
    assert_eq!(ours.iter().map(|t| &t.0).collect::<Vec<_>>(), peft.iter().map(|t| &t.0).collect::<Vec<_>>());
    let max = ours.iter().zip(&peft).flat_map(|(a, b)| a.1.iter().zip(&b.1).map(|(x, y)| (x - y).abs())).fold(0f32, f32::max);
    assert!(f64::from(max) < tol, "final adapter differs from {reference}'s by {max}");
    want
}

#[test]
fn the_cli_matches_a_torch_and_peft_loop_step_for_step() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = run_args(&reference_flags(&out, 30, true));
    assert!(o.status.success(), "{}", stderr(&o));
    // The losses, and the saved PEFT adapter against the one PEFT saved after the same 30 steps.
    assert_matches_reference(&out, "train_reference", 1e-3);
    let config: Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((config["r"].as_u64(), config["lora_alpha"].as_f64()), (Some(4), Some(8.0)), "{config}");
}

/// LoRA+ (`--lora-plus-ratio 4`) against PEFT's `create_loraplus_optimizer` in the same torch
/// loop for 10 steps (`tests/fixtures/train_reference_loraplus`, made by
/// `train_reference/make_train_reference.py --loraplus-ratio 4 --steps 10`).
#[test]
fn lora_plus_matches_peft_s_loraplus_optimizer() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |out: &Path, extra: &[&str]| {
        let mut args = reference_flags(out, 10, true);
        args.extend(extra.iter().map(|x| x.to_string()));
        let o = run_args(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        curve(out, "train_loss")
    };
    let (plus, plain) = (tmp.path().join("plus"), tmp.path().join("plain"));
    run(&plus, &["--lora-plus-ratio", "4"]);
    let want = assert_matches_reference(&plus, "train_reference_loraplus", 1e-4);
    // The ratio is what made the difference: plain LoRA drifts from that curve.
    let plain = run(&plain, &[]);
    let apart = plain.iter().zip(&want).map(|((_, a), b)| (a - b).abs()).fold(0f64, f64::max);
    assert!(apart > 1e-2, "plain LoRA gives LoRA+'s losses within {apart}: the test cannot tell them apart");
    // A ratio that is not a positive number is refused, naming the setting.
    let o = run_args(&[reference_flags(&tmp.path().join("bad"), 1, false), vec!["--lora-plus-ratio".into(), "0".into()]].concat());
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("lora_plus_ratio"), "{}", stderr(&o));
}

/// `--keep-best`: best/ holds the adapter of the lowest validation loss in metrics.jsonl, the
/// same weights as that iteration's snapshot, and best.json says which.
#[test]
fn keep_best_keeps_the_adapter_of_the_lowest_validation_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let args = [
        "train",
        "--config",
        "configs/quickstart.toml",
        "--adapter-path",
        s(&out),
        "--iters",
        "12",
        "--steps-per-eval",
        "2",
        "--save-every",
        "1",
        "--keep-best",
    ];
    let o = lora(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let evals = curve(&out, "val_loss");
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), [0, 1, 3, 5, 7, 9, 11], "evaluations");
    let best = evals.iter().fold(evals[0], |b, e| if e.1 < b.1 { *e } else { b });
    assert!(best.0 > 0, "training must lower the validation loss for this test to mean anything: {evals:?}");
    let about: Value = serde_json::from_str(&std::fs::read_to_string(out.join("best/best.json")).unwrap()).unwrap();
    assert_eq!((about["step"].as_u64(), about["val_loss"].as_f64()), (Some(best.0), Some(best.1)), "{about}");
    let kept = tensors(&out.join("best/adapter_model.safetensors"));
    let snapshot = tensors(&out.join(format!("{:07}_adapter_model.safetensors", best.0)));
    assert_eq!(kept, snapshot, "best/ holds the weights evaluated at step {}", best.0);
    assert!(out.join("best/adapter_config.json").is_file());
    assert!(!out.join(".best.new").exists() && !out.join(".best.old").exists());
    // Without validation data it is refused before anything is written.
    let bare = tmp.path().join("bare");
    let o = run_args(&[reference_flags(&bare, 2, false), vec!["--keep-best".into()]].concat());
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--keep-best needs validation data"), "{}", stderr(&o));
    assert!(!bare.join("trainer_state.safetensors").exists());
}

/// `--early-stop-patience`: a min-delta no loss can beat stops the run after `patience`
/// evaluations past the first; the stop saves a checkpoint, and a resumed run with a larger
/// patience goes on counting from there without counting the evaluation it repeats twice.
#[test]
fn early_stopping_stops_after_patience_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let mut args: Vec<String> = [
        "train",
        "--config",
        "configs/quickstart.toml",
        "--adapter-path",
        s(&out),
        "--iters",
        "20",
        "--steps-per-eval",
        "2",
        "--save-every",
        "0",
        "--steps-per-report",
        "1",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    args.extend(["--early-stop-min-delta", "100", "--early-stop-patience", "2"].map(String::from));
    let o = run_args(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    // Evaluations after 0 (the first: the best), 1 and 3 iterations: two without improvement.
    assert!(stderr(&o).contains("Stopped early at iteration 3"), "{}", stderr(&o));
    assert_eq!(curve(&out, "val_loss").iter().map(|e| e.0).collect::<Vec<_>>(), [0, 1, 3]);
    assert_eq!(curve(&out, "train_loss").last().map(|e| e.0), Some(3));
    assert!(out.join("trainer_state.safetensors").is_file() && out.join("adapter_model.safetensors").is_file());
    // Resumed with patience 5: the evaluation after 3 iterations is repeated but not counted
    // again, so the count reaches 5 at the evaluation after 9 (3 more: after 5, 7, 9).
    let o = lora(&["train", "--resume", s(&out), "--early-stop-patience", "5"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("Stopped early at iteration 9"), "{}", stderr(&o));
    assert_eq!(curve(&out, "val_loss").iter().map(|e| e.0).collect::<Vec<_>>(), [0, 1, 3, 5, 7, 9]);
    // Settings that cannot work are refused, naming the key.
    for (flag, value, key) in [("--early-stop-patience", "0", "early_stop_patience"), ("--early-stop-min-delta", "-1", "early_stop_min_delta")] {
        let o = lora(&["train", "--config", "configs/quickstart.toml", "--adapter-path", s(&tmp.path().join("bad")), "--iters", "2", flag, value]);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains(key), "{}", stderr(&o));
    }
}

#[test]
fn recomputing_blocks_gives_the_same_run() {
    // --grad-checkpoint recomputes each block in backward; the losses and the adapter must
    // not change.
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("plain"), tmp.path().join("recompute"));
    let run = |out: &Path, initial: bool, extra: &[&str]| {
        let mut args = reference_flags(out, 8, initial);
        args.extend(extra.iter().map(|x| x.to_string()));
        let o = run_args(&args);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    run(&a, true, &[]);
    run(&b, true, &["--grad-checkpoint"]);
    let (x, y) = (curve(&a, "train_loss"), curve(&b, "train_loss"));
    for ((_, p), (_, q)) in x.iter().zip(&y) {
        assert!((p - q).abs() < 1e-5, "{x:?} vs {y:?}");
    }
    // Only the last block adapted: the first is never differentiated.
    let (c, d) = (tmp.path().join("plain1"), tmp.path().join("recompute1"));
    let last = |out: &Path, extra: &[&str]| {
        let mut args = reference_flags(out, 8, false);
        let at = args.iter().position(|a| a == "--num-layers").unwrap();
        args[at + 1] = "1".into();
        args.extend(extra.iter().map(|x| x.to_string()));
        let o = run_args(&args);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    last(&c, &[]);
    last(&d, &["--grad-checkpoint"]);
    let (x, y) = (curve(&c, "train_loss"), curve(&d, "train_loss"));
    assert!(x.len() == 8 && x[7].1 < x[0].1, "{x:?}");
    for ((_, p), (_, q)) in x.iter().zip(&y) {
        assert!((p - q).abs() < 1e-5, "{x:?} vs {y:?}");
    }
}

/// A run whose every source of randomness matters: shuffled batches, dropout, gradient
/// accumulation, validation.
fn resumable(out: &Path, iters: usize, save_every: usize) -> Vec<String> {
    let mut args: Vec<String> = [
        "train",
        "--config",
        "configs/quickstart.toml",
        "--adapter-path",
        s(out),
        "--steps-per-report",
        "1",
        "--steps-per-eval",
        "3",
        "--dropout",
        "0.1",
        "--grad-accumulation-steps",
        "2",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    args.extend(["--iters".to_string(), iters.to_string(), "--save-every".to_string(), save_every.to_string()]);
    args
}

fn run_args(args: &[String]) -> Output {
    lora(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
#[cfg_attr(not(debug_assertions), ignore = "the LORA_TEST_ABORT_AT hook exists in debug builds only")]
fn a_run_killed_mid_way_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole");
    let o = run_args(&resumable(&whole, 12, 4));
    assert!(o.status.success(), "{}", stderr(&o));

    // Dies like `kill -9` after iteration 6: the last checkpoint is at 4, metrics exist up to 5.
    let cut = tmp.path().join("cut");
    let o = command().args(resumable(&cut, 12, 4)).env("LORA_TEST_ABORT_AT", "6").output().unwrap();
    assert!(!o.status.success(), "the run was meant to die");
    assert!(curve(&cut, "train_loss").iter().any(|(s, _)| *s == 5), "it had gone past its checkpoint");
    assert!(!cut.join("0000008_adapter_model.safetensors").exists());
    // What a kill in the middle of an atomic write leaves (issue 14, defect 12) is cleaned up.
    let stale = cut.join(".adapter_model.safetensors.tmp-999999");
    std::fs::write(&stale, b"half").unwrap();
    let o = lora(&["train", "--resume", s(&cut)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stale.exists(), "the stale temporary is removed");
    assert!(stderr(&o).contains("Resuming") && stderr(&o).contains("iteration 4"), "{}", stderr(&o));

    assert_eq!(curve(&cut, "train_loss"), curve(&whole, "train_loss"), "the same loss curve");
    assert_eq!(curve(&cut, "val_loss"), curve(&whole, "val_loss"), "the same validation curve");
    for name in ["adapter_model.safetensors", "0000008_adapter_model.safetensors", "0000012_adapter_model.safetensors"] {
        assert_eq!(std::fs::read(cut.join(name)).unwrap(), std::fs::read(whole.join(name)).unwrap(), "{name} differs");
    }
    // Killed at other points (just before and after a checkpoint, the last iteration): each
    // resumes to the same final adapter (README: "killed after any iteration").
    // Before the first checkpoint there is nothing to resume: a clear error saying so.
    let early = tmp.path().join("early");
    let o = command().args(resumable(&early, 12, 4)).env("LORA_TEST_ABORT_AT", "1").output().unwrap();
    assert!(!o.status.success(), "the run was meant to die");
    let o = lora(&["train", "--resume", s(&early)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("no checkpoint there yet") && stderr(&o).contains("without --resume"), "{}", stderr(&o));
    for at in [5, 8, 11] {
        let cut = tmp.path().join(format!("cut{at}"));
        let o = command().args(resumable(&cut, 12, 4)).env("LORA_TEST_ABORT_AT", at.to_string()).output().unwrap();
        assert!(!o.status.success(), "the run was meant to die at {at}");
        let o = lora(&["train", "--resume", s(&cut)]);
        assert!(o.status.success(), "killed at {at}: {}", stderr(&o));
        let name = "adapter_model.safetensors";
        assert_eq!(std::fs::read(cut.join(name)).unwrap(), std::fs::read(whole.join(name)).unwrap(), "killed at {at}: the final adapter differs");
        assert_eq!(curve(&cut, "train_loss"), curve(&whole, "train_loss"), "killed at {at}: the loss curve differs");
    }
    // Resuming with --iters at or below where the run is: an error, not a silent success.
    let o = lora(&["train", "--resume", s(&cut), "--iters", "8"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("iteration 12") && stderr(&o).contains("--iters 8"), "{}", stderr(&o));
}

/// README: `trainer_state.safetensors` is written atomically (a new file renamed over the old,
/// so a crash mid-write never leaves half of one): the old file's inode keeps its bytes when a
/// resumed run checkpoints again, which an in-place rewrite would change.
#[cfg(unix)]
#[test]
fn the_resume_file_is_replaced_whole_not_rewritten_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = run_args(&resumable(&out, 4, 2));
    assert!(o.status.success(), "{}", stderr(&o));
    let (state, old) = (out.join("trainer_state.safetensors"), tmp.path().join("old-state"));
    std::fs::hard_link(&state, &old).unwrap();
    let before = std::fs::read(&old).unwrap();
    let o = lora(&["train", "--resume", s(&out), "--iters", "6"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&old).unwrap(), before, "the resume file was rewritten in place");
    assert_ne!(std::fs::read(&state).unwrap(), before, "the resumed run saved a new state");
}

#[cfg(unix)]
#[test]
fn ctrl_c_saves_a_checkpoint_that_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let args = resumable(&out, 100_000, 100_000);
    let child = command().args(&args).stderr(std::process::Stdio::piped()).spawn().unwrap();
    // Wait until it trains, then interrupt it.
    let metrics = out.join("metrics.jsonl");
    let start = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 3 {
        assert!(start.elapsed().as_secs() < 120, "the run did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("Interrupted at iteration") && err.contains("--resume"), "{err}");
    assert!(out.join("trainer_state.safetensors").is_file() && out.join("adapter_model.safetensors").is_file());
    // It continues from there.
    let o = lora(&["train", "--resume", s(&out), "--iters", &(curve(&out, "train_loss").last().unwrap().0 + 2).to_string()]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn the_quickstart_learns_and_generate_shows_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("qs");
    let o = lora(&["train", "--config", "configs/quickstart.toml", "--adapter-path", s(&out), "--test"]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("Trainable parameters: ") && err.contains("% (0.030M/0.143M)"), "{err}");
    assert!(err.contains("Iter 20: Train loss") && err.contains("Peak mem"), "{err}");
    let train = curve(&out, "train_loss");
    assert!(train.last().unwrap().1 < train[0].1 - 3.0, "the loss must visibly drop: {train:?}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.starts_with("Test loss ") && stdout.contains("Test ppl"), "{stdout}");
    // Every report and evaluation is in metrics.jsonl with the documented fields.
    let m = metrics(&out);
    let report = m.iter().find(|v| v.get("train_loss").is_some()).unwrap();
    for key in ["step", "train_loss", "lr", "tokens_per_s", "trained_tokens", "peak_mem_gb"] {
        assert!(report.get(key).is_some(), "{key} missing in {report}");
    }
    assert!(m.iter().any(|v| v.get("val_loss").is_some()));
    let png = std::fs::read(out.join("loss.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 5000, "loss.png");
    let saved = std::fs::read_to_string(out.join("train_config.toml")).unwrap();
    assert!(saved.contains("learning_rate = 0.005") && saved.contains("[lora_parameters]"), "{saved}");
    for name in ["adapter_config.json", "adapter_model.safetensors", "0000800_adapter_model.safetensors", "trainer_state.safetensors"] {
        assert!(out.join(name).is_file(), "{name}");
    }

    let o =
        lora(&["generate", "--model", "tests/fixtures/llama", "--adapter-path", s(&out), "--prompt", "What is the capital of Germany?", "--max-tokens", "24"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "The capital of Germany is Berlin.");

    // --test alone evaluates the adapter it finds, and the base without one.
    let test = |adapter: &Path| {
        let o = lora(&[
            "train",
            "--model",
            "tests/fixtures/llama",
            "--data",
            "tests/fixtures/quickstart",
            "--test",
            "--adapter-path",
            s(adapter),
            "--mask-prompt",
            "--device",
            "cpu",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        text.trim().strip_prefix("Test loss ").unwrap().split(',').next().unwrap().parse::<f64>().unwrap()
    };
    let (adapted, base) = (test(&out), test(&tmp.path().join("none")));
    assert!(adapted < base - 1.0, "adapter {adapted} vs base {base}");
}

#[test]
fn bad_configs_and_flags_name_the_key_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("x.toml");
    std::fs::write(&config, "model = \"tests/fixtures/llama\"\ndata = \"tests/fixtures/quickstart\"\nlearning_rat = 1e-4\n").unwrap();
    let out = tmp.path().join("out");
    let o = lora(&["train", "--config", s(&config), "--adapter-path", s(&out)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("learning_rat") && stderr(&o).contains("x.toml"), "{}", stderr(&o));
    assert!(!out.exists());

    let o = lora(&["train", "--model", "tests/fixtures/llama", "--data", "tests/fixtures/quickstart", "--batch-size", "0", "--adapter-path", s(&out)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("batch_size"), "{}", stderr(&o));

    let o = lora(&[
        "train",
        "--model",
        "tests/fixtures/llama",
        "--data",
        "tests/fixtures/quickstart",
        "--keys",
        "q_prj",
        "--adapter-path",
        s(&out),
        "--device",
        "cpu",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("q_prj"), "{}", stderr(&o));
    assert!(!out.join("adapter_model.safetensors").exists());
}

#[test]
fn a_diverging_run_stops_with_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("nan");
    let o = lora(&[
        "train",
        "--config",
        "configs/quickstart.toml",
        "--adapter-path",
        s(&out),
        "--learning-rate",
        "1e30",
        "--lr-schedule",
        "constant",
        "--warmup",
        "0",
        "--optimizer",
        "sgd",
        "--save-every",
        "1",
        "--iters",
        "50",
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("the training loss is") && err.contains("at iteration") && err.contains("last good checkpoint"), "{err}");
    assert!(out.join("trainer_state.safetensors").is_file(), "the last good checkpoint stays");
    // The checkpoint it names holds finite weights (README: "names the last good checkpoint").
    let named = err.split("The last good checkpoint: iteration ").nth(1).and_then(|t| t.split(',').next()).and_then(|n| n.parse::<usize>().ok());
    let named = named.unwrap_or_else(|| panic!("no checkpoint named: {err}"));
    let snapshot = out.join(format!("{named:07}_adapter_model.safetensors"));
    let weights = tensors(&snapshot);
    assert!(!weights.is_empty() && weights.iter().all(|(_, v)| v.iter().all(|x| x.is_finite())), "{} is not finite", snapshot.display());
    // A new run does not overwrite it.
    let o = lora(&["train", "--config", "configs/quickstart.toml", "--adapter-path", s(&out), "--iters", "2"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--resume"), "{}", stderr(&o));
}

/// `tests/fixtures/train_reference_q4`: a torch + PEFT loop on the MLX-dequantized base,
/// over chat-templated prompt/completion rows with the prompt masked.
fn four_bit_chat_run(device: &str, dtype: &str) -> Option<Vec<(u64, f64)>> {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q4");
    let r = fixture("train_reference_q4");
    let o = lora(&[
        "train",
        "--model",
        "tests/fixtures/llama",
        "--data",
        s(&r.join("data")),
        "--quantize",
        "affine",
        "--q-group-size",
        "32",
        "--resume-adapter-file",
        s(&r.join("initial")),
        "--mask-prompt",
        "--batch-size",
        "2",
        "--iters",
        "20",
        "--optimizer",
        "adamw",
        "--weight-decay",
        "0",
        "--learning-rate",
        "1e-2",
        "--lr-schedule",
        "linear",
        "--warmup",
        "2",
        "--shuffle",
        "false",
        "--steps-per-report",
        "1",
        "--num-layers",
        "-1",
        "--save-every",
        "0",
        "--device",
        device,
        "--dtype",
        dtype,
        "--adapter-path",
        s(&out),
    ]);
    if device == "wgpu" && !o.status.success() && stderr(&o).contains("no wgpu adapter") && std::env::var_os("LORA_REQUIRE_WGPU").is_none() {
        eprintln!("wgpu does not run here: skipped");
        return None;
    }
    assert!(o.status.success(), "{}", stderr(&o));
    Some(curve(&out, "train_loss"))
}

fn check_four_bit(got: &[(u64, f64)], tolerance: f64) {
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(fixture("train_reference_q4/expected.json")).unwrap()).unwrap();
    let want: Vec<f64> = serde_json::from_value(expected["losses"].clone()).unwrap();
    assert_eq!(got.len(), want.len());
    for ((step, loss), want) in got.iter().zip(&want) {
        assert!((loss - want).abs() < tolerance, "step {step}: {loss} vs torch on the dequantized base {want}");
    }
    assert!(want[19] < want[0] - 2.0, "the reference learns");
}

#[test]
fn a_four_bit_base_with_masked_chat_rows_matches_torch_on_the_dequantized_base() {
    check_four_bit(&four_bit_chat_run("cpu", "f32").unwrap(), 1e-3);
}

#[test]
fn a_four_bit_base_with_masked_chat_rows_matches_torch_on_wgpu() {
    if let Some(got) = four_bit_chat_run("wgpu", "f32") {
        check_four_bit(&got, 1e-3);
    }
}

#[test]
fn half_precision_compute_with_f32_adapters_stays_near_the_f32_reference() {
    // Measured: f16 within 2.6e-3 of the f32 reference over 20 steps, bf16 within 0.024.
    check_four_bit(&four_bit_chat_run("cpu", "f16").unwrap(), 0.01);
    check_four_bit(&four_bit_chat_run("cpu", "bf16").unwrap(), 0.05);
}

#[test]
fn epochs_set_the_length_from_the_batches_per_epoch() {
    // 32 rows in batches of 4: 8 iterations an epoch.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ep");
    let o = lora(&["train", "--config", "configs/quickstart.toml", "--adapter-path", s(&out), "--epochs", "2", "--steps-per-report", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("16 iterations (2.00 epochs)"), "{}", stderr(&o));
    assert_eq!(curve(&out, "train_loss").last().unwrap().0, 16);
    // The flag replaced the file's `iters`; both flags at once is an error naming the key.
    let o = lora(&["train", "--config", "configs/quickstart.toml", "--adapter-path", s(&tmp.path().join("x")), "--epochs", "2", "--iters", "5"]);
    assert!(!o.status.success() && stderr(&o).contains("epochs"), "{}", stderr(&o));
}

/// Every file under `dir`, with its bytes.
fn snapshot(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut files: Vec<_> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_file()).map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect();
    files.sort();
    files
}

/// Issue 14, defect 1: a directory holding someone else's adapter or files is refused (exit 2,
/// nothing written); `--force` writes beside them but never over the adapter it starts from;
/// an adapter path inside the model or the data directory is refused and not created.
#[test]
fn train_never_overwrites_a_directory_it_did_not_make() {
    let tmp = tempfile::tempdir().unwrap();
    let theirs = tmp.path().join("adapters");
    std::fs::create_dir(&theirs).unwrap();
    for name in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixture("train_reference/initial").join(name), theirs.join(name)).unwrap();
    }
    std::fs::write(theirs.join("metrics.jsonl"), "{\"mine\": true}\n").unwrap();
    let before = snapshot(&theirs);
    let quick = ["train", "--config", "configs/quickstart.toml", "--iters", "2", "--steps-per-eval", "100", "--adapter-path", s(&theirs)];

    let o = lora(&quick);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("not empty") && stderr(&o).contains("--force"), "{}", stderr(&o));
    assert_eq!(snapshot(&theirs), before);

    // Starting from the adapter in the directory it would write: refused even with --force.
    let start = theirs.join("adapter_model.safetensors");
    let o = lora(&[&quick[..], &["--resume-adapter-file", s(&start), "--force"]].concat());
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--resume-adapter-file"), "{}", stderr(&o));
    assert_eq!(snapshot(&theirs), before);

    // Inside the model or the data directory, or the data directory itself.
    for inside in [fixture("llama").join("run"), fixture("quickstart"), fixture("quickstart").join("run")] {
        let o = lora(&["train", "--config", "configs/quickstart.toml", "--iters", "2", "--adapter-path", s(&inside)]);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains("inside"), "{}", stderr(&o));
        assert!(!fixture("llama").join("run").exists() && !fixture("quickstart").join("run").exists());
    }

    // With --force the run writes, and a file of the user's that the run does not make stays.
    let own = tmp.path().join("own");
    std::fs::create_dir(&own).unwrap();
    std::fs::write(own.join("notes.txt"), "keep me").unwrap();
    let o = lora(&["train", "--config", "configs/quickstart.toml", "--iters", "2", "--steps-per-eval", "100", "--adapter-path", s(&own), "--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(own.join("notes.txt")).unwrap(), "keep me");
    assert!(own.join("adapter_model.safetensors").is_file());
}

/// README's promises (issue 14, "backed by a named test"): `--force` never writes into the
/// model or the data, nor into a directory holding them; and running a finished run's command
/// again is refused with every file of the earlier run left as it was.
#[test]
fn force_never_writes_into_the_inputs_and_a_rerun_leaves_the_earlier_run_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = (tmp.path().join("m"), tmp.path().join("d"));
    for (from, to) in [(fixture("llama"), &model), (fixture("quickstart"), &data)] {
        std::fs::create_dir(to).unwrap();
        copy_files(&from, to);
    }
    let (model_before, data_before) = (snapshot(&model), snapshot(&data));
    for out in [model.clone(), data.clone(), model.join("run"), tmp.path().to_path_buf()] {
        let o = lora(&[
            "train",
            "--config",
            "configs/quickstart.toml",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--iters",
            "2",
            "--adapter-path",
            s(&out),
            "--force",
        ]);
        assert_eq!(o.status.code(), Some(2), "{}: {}", out.display(), stderr(&o));
        assert!(stderr(&o).contains("inside"), "{}", stderr(&o));
        assert_eq!((snapshot(&model), snapshot(&data)), (model_before.clone(), data_before.clone()), "{}", out.display());
        assert!(!model.join("run").exists());
    }

    let out = tmp.path().join("out");
    let run = ["train", "--config", "configs/quickstart.toml", "--iters", "2", "--save-every", "1", "--steps-per-eval", "100", "--adapter-path", s(&out)];
    let o = lora(&run);
    assert!(o.status.success(), "{}", stderr(&o));
    let before = snapshot(&out);
    assert!(before.iter().any(|(p, _)| p.ends_with("trainer_state.safetensors")));
    let o = lora(&run);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--resume"), "{}", stderr(&o));
    assert_eq!(snapshot(&out), before, "the earlier run's files changed");
}

/// Issue 14, defect 7: while a run holds its adapter directory, a second run on it (a resume,
/// or a fresh run with --force) is refused instead of writing over the first.
#[cfg(unix)]
#[test]
fn two_runs_on_one_adapter_directory_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let args = resumable(&out, 100_000, 100_000);
    let mut child = command().args(&args).stderr(std::process::Stdio::null()).spawn().unwrap();
    let metrics = out.join("metrics.jsonl");
    let start = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 2 {
        assert!(start.elapsed().as_secs() < 120, "the run did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let o = lora(&["train", "--resume", s(&out), "--iters", "3"]);
    // A fresh run with --force passes the emptiness check and must meet the lock too.
    let forced = lora(&[
        "train",
        "--config",
        "configs/quickstart.toml",
        "--adapter-path",
        s(&out),
        "--iters",
        "2",
        "--save-every",
        "1",
        "--steps-per-eval",
        "100",
        "--force",
    ]);
    let _ = child.kill();
    let _ = child.wait();
    for o in [&o, &forced] {
        assert_eq!(o.status.code(), Some(2), "{}", stderr(o));
        assert!(stderr(o).contains("another lora train run"), "{}", stderr(o));
    }
    assert!(!out.join("0000001_adapter_model.safetensors").exists(), "the forced run wrote into the held directory");
}

/// Issue 14, defect 10: `--mask-prompt` with every target cut off by `--max-seq-length` is an
/// error naming the file, not a run that trains on nothing and reports a loss of 0.
#[test]
fn every_target_cut_off_by_max_seq_length_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = lora(&["train", "--config", "configs/quickstart.toml", "--iters", "2", "--max-seq-length", "4", "--adapter-path", s(&out)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("train.jsonl") && stderr(&o).contains("--mask-prompt"), "{}", stderr(&o));
    assert!(!out.exists(), "nothing is written");
}

/// Issue 14, defect 10: a resume file with a flipped bit is refused as damaged (its checksum),
/// not resumed from wrong numbers.
#[test]
fn a_damaged_resume_file_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = lora(&["train", "--config", "configs/quickstart.toml", "--iters", "2", "--save-every", "1", "--steps-per-eval", "100", "--adapter-path", s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let path = out.join("trainer_state.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 5;
    bytes[last] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let o = lora(&["train", "--resume", s(&out), "--iters", "4"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("trainer_state.safetensors") && stderr(&o).contains("damaged"), "{}", stderr(&o));
}

/// A finished quickstart run of `iters` iterations, checkpointed at each, in `out`.
fn finished_run(out: &Path, iters: &str) {
    let o = lora(&[
        "train",
        "--config",
        "configs/quickstart.toml",
        "--iters",
        iters,
        "--save-every",
        "1",
        "--steps-per-eval",
        "100",
        "--steps-per-report",
        "1",
        "--adapter-path",
        s(out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Issue 14, defect 10: `--resume DIR --iters N` with N at or below the iteration the run has
/// finished exited 0 having trained nothing; it is refused naming both, and the run's files
/// are left as they were. One iteration more resumes.
#[test]
fn resume_with_iters_at_or_below_the_finished_iteration_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    finished_run(&out, "2");
    let before = snapshot(&out);
    for iters in ["2", "1"] {
        let o = lora(&["train", "--resume", s(&out), "--iters", iters]);
        assert_eq!(o.status.code(), Some(2), "--iters {iters}: {}", stderr(&o));
        let wanted = format!("the run is at iteration 2, so --iters {iters} leaves nothing to do");
        assert!(stderr(&o).contains(&wanted), "{}", stderr(&o));
        assert_eq!(snapshot(&out), before, "--iters {iters}: the run's files changed");
    }
    let o = lora(&["train", "--resume", s(&out), "--iters", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("Resuming") && stderr(&o).contains("iteration 2"), "{}", stderr(&o));
    assert_eq!(curve(&out, "train_loss").iter().map(|(step, _)| *step).collect::<Vec<_>>(), [1, 2, 3]);
}

/// Issue 14, defect 12: a run killed in the middle of an atomic write leaves its
/// `.NAME.tmp-PID` file behind; the next run on the directory removes such files when it
/// starts, and nothing else (a user's files of like names, a directory).
#[test]
fn stale_temporaries_are_removed_when_a_run_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    finished_run(&out, "2");
    let stale = [".adapter_model.safetensors.tmp-999999", ".trainer_state.safetensors.tmp-31337", ".loss.png.tmp-4242.png"];
    let kept = ["notes.tmp-1", ".draft.tmp-v2", ".half.tmp-"];
    for name in stale.iter().chain(&kept) {
        std::fs::write(out.join(name), b"half").unwrap();
    }
    std::fs::create_dir(out.join(".dir.tmp-7")).unwrap();
    let o = lora(&["train", "--resume", s(&out), "--iters", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    for name in stale {
        assert!(!out.join(name).exists(), "{name} is left");
    }
    for name in kept {
        assert_eq!(std::fs::read(out.join(name)).unwrap(), b"half", "{name} is removed");
    }
    assert!(out.join(".dir.tmp-7").is_dir(), "a directory is not a temporary file");
}

/// README ("refused and left as it is"): `--resume` of a directory holding a run's settings
/// but no checkpoint yet (it stopped before its first save) took the directory's lock, creating
/// `.lora-train.lock` and removing stale temporaries, before refusing. It is refused first.
#[test]
fn a_resume_without_a_checkpoint_leaves_the_directory_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let done = tmp.path().join("done");
    finished_run(&done, "1");
    let early = tmp.path().join("early");
    std::fs::create_dir(&early).unwrap();
    std::fs::copy(done.join("train_config.toml"), early.join("train_config.toml")).unwrap();
    std::fs::write(early.join(".adapter_model.safetensors.tmp-999999"), b"half").unwrap();
    let before = snapshot(&early);
    let o = lora(&["train", "--resume", s(&early)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("no checkpoint there yet") && stderr(&o).contains("without --resume"), "{}", stderr(&o));
    assert_eq!(snapshot(&early), before, "the refused directory changed");
    assert!(!early.join(".lora-train.lock").exists());
}

/// Issue 14, defect 11: a FIFO or a device as `train.jsonl` was reported as "no train.jsonl";
/// `train` names it as no regular file and never opens it (a FIFO without a writer is waited
/// on for ever, /dev/zero has no end), and writes nothing.
#[cfg(unix)]
#[test]
fn a_fifo_or_a_device_as_train_jsonl_is_named_as_no_regular_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (fifo, device) = (tmp.path().join("fifo"), tmp.path().join("device"));
    for data in [&fifo, &device] {
        std::fs::create_dir(data).unwrap();
        std::fs::copy(fixture("quickstart").join("valid.jsonl"), data.join("valid.jsonl")).unwrap();
    }
    assert!(Command::new("mkfifo").arg(fifo.join("train.jsonl")).status().unwrap().success());
    std::os::unix::fs::symlink("/dev/zero", device.join("train.jsonl")).unwrap();
    for data in [&fifo, &device] {
        let out = tmp.path().join("run");
        let mut child = command()
            .args(["train", "--config", "configs/quickstart.toml", "--data", s(data), "--iters", "1", "--adapter-path", s(&out)])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed().as_secs() > 120 {
                let _ = child.kill();
                panic!("{}: the run is still reading train.jsonl", data.display());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{}: {}", data.display(), stderr(&o));
        assert!(stderr(&o).contains("train.jsonl") && stderr(&o).contains("not a regular file"), "{}", stderr(&o));
        assert!(!out.exists(), "nothing is written");
    }
}

/// Issue 14, defect 10: `--num-layers` beyond the model's blocks was taken silently; it warns,
/// and every block (the fixture has 2) is adapted and saved.
#[test]
fn num_layers_beyond_the_model_warns_and_adapts_every_block() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = lora(&["train", "--config", "configs/quickstart.toml", "--iters", "1", "--steps-per-eval", "100", "--num-layers", "99", "--adapter-path", s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("[WARNING] --num-layers 99 is more than the model's 2 blocks; all 2 are adapted."), "{}", stderr(&o));
    let file = lora_adapters::format::load(&out).unwrap();
    let mut blocks: Vec<&str> = file.weights.iter().filter_map(|w| w.module.strip_prefix("model.layers.")?.split('.').next()).collect();
    blocks.sort_unstable();
    blocks.dedup();
    assert_eq!(blocks, ["0", "1"], "{:?}", file.weights.iter().map(|w| &w.module).collect::<Vec<_>>());
    let config: Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["layers_to_transform"], serde_json::json!([0, 1]));
}

/// Issue 16, packing: `--pack` trains (the report says how the rows were packed), and the test
/// loss of a trained adapter is the same packed as unpacked (batches of 3 over 8 test rows: the
/// same 6 rows either way).
#[test]
fn packed_rows_train_and_test_as_unpacked_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("packed");
    let quick = ["train", "--config", "configs/quickstart.toml", "--adapter-path", s(&out), "--max-seq-length", "256"];
    let o = lora(&[&quick[..], &["--pack", "--iters", "4", "--steps-per-eval", "2", "--steps-per-report", "1"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    // The rows are 70 to 90 tokens: about three to a sequence.
    assert!(stderr(&o).contains("Packed the 32 rows of train.jsonl into 11 sequences of at most 256 tokens"), "{}", stderr(&o));

    assert_eq!(curve(&out, "train_loss").len(), 4);
    assert!(curve(&out, "val_loss").iter().all(|(_, l)| l.is_finite()));
    let test = |pack: &str| {
        let o = lora(&[&quick[..], &["--train", "false", "--test", "--batch-size", "3", "--pack", pack]].concat());
        assert!(o.status.success(), "{}", stderr(&o));
        let stdout = String::from_utf8_lossy(&o.stdout).to_string();
        stdout.lines().find_map(|l| l.strip_prefix("Test loss ")?.split(',').next().map(str::to_string)).expect("a test loss")
    };
    assert_eq!(test("true"), test("false"));
}

/// The flags that reproduce run `name` of `tests/fixtures/preference_reference` (see its
/// script) for `iters` iterations from its initial adapter, into `out`.
fn preference_flags(out: &Path, name: &str, iters: usize) -> Vec<String> {
    let r = fixture("preference_reference");
    let (objective, loss, data) = match name {
        "dpo_ipo" => ("dpo", "ipo", "data"),
        "dpo_sigmoid_chat" => ("dpo", "sigmoid", "data_chat"),
        "orpo" => ("orpo", "sigmoid", "data"),
        _ => ("dpo", "sigmoid", "data"),
    };
    let (model, data, initial) = (fixture("llama"), r.join(data), r.join("initial"));
    #[rustfmt::skip]
    let args = [
        "train", "--model", s(&model), "--data", s(&data), "--adapter-path", s(out),
        "--resume-adapter-file", s(&initial), "--device", "cpu", "--objective", objective, "--loss-type", loss,
        "--beta", "0.1", "--batch-size", "2", "--shuffle", "false", "--optimizer", "adamw", "--weight-decay", "0",
        "--learning-rate", "1e-3", "--max-grad-norm", "1", "--steps-per-report", "1", "--save-every", "5",
    ];
    let mut args: Vec<String> = args.iter().map(|x| x.to_string()).collect();
    args.extend(["--iters".to_string(), iters.to_string()]);
    args
}

/// Each step's loss and rewards in `metrics.jsonl`, and the final adapter, against TRL's run
/// `name`.
fn assert_matches_trl(out: &Path, name: &str) {
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(fixture("preference_reference").join("expected.json")).unwrap()).unwrap();
    let steps = expected["runs"][name]["steps"].as_array().unwrap();
    let reports: Vec<Value> = metrics(out).into_iter().filter(|m| m.get("train_loss").is_some()).collect();
    assert_eq!(reports.len(), steps.len(), "one report per step");
    for (got, want) in reports.iter().zip(steps) {
        for (ours, theirs) in
            [("train_loss", "loss"), ("rewards/chosen", "rewards/chosen"), ("rewards/margins", "rewards/margins"), ("rewards/accuracies", "rewards/accuracies")]
        {
            let (a, b) = (got[ours].as_f64().unwrap(), want[theirs].as_f64().unwrap());
            assert!((a - b).abs() < 1e-4 * b.abs().max(1.0), "{name} step {}: {ours} {a} against TRL's {b}", got["step"]);
        }
    }
    let ours = tensors(&out.join("adapter_model.safetensors"));
    let theirs = tensors(&fixture("preference_reference").join("final").join(name).join("adapter_model.safetensors"));
    assert_eq!(ours.iter().map(|t| &t.0).collect::<Vec<_>>(), theirs.iter().map(|t| &t.0).collect::<Vec<_>>());
    let max = ours.iter().zip(&theirs).flat_map(|(a, b)| a.1.iter().zip(&b.1).map(|(x, y)| (x - y).abs())).fold(0f32, f32::max);
    assert!(max < 1e-4, "{name}: the final adapter differs from TRL's by {max}");
}

/// `--objective dpo` and `orpo` from the command line reproduce TRL's DPOTrainer and
/// ORPOTrainer with PEFT step for step (loss and rewards in metrics.jsonl, the final adapter),
/// and a DPO run stopped half-way and resumed ends where the whole run does.
#[test]
fn dpo_and_orpo_from_the_cli_match_trl_and_resume_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["dpo_sigmoid", "dpo_ipo", "orpo"] {
        let out = tmp.path().join(name);
        let o = run_args(&preference_flags(&out, name, 20));
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        assert!(stderr(&o).contains("rewards/margins"), "{}", stderr(&o));
        assert_matches_trl(&out, name);
    }
    let out = tmp.path().join("resumed");
    let o = run_args(&preference_flags(&out, "dpo_sigmoid", 10));
    assert!(o.status.success(), "{}", stderr(&o));
    let o = lora(&["train", "--resume", s(&out), "--iters", "20"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_matches_trl(&out, "dpo_sigmoid");
    // The resumed run keeps its objective; another one is refused and changes nothing.
    let o = lora(&["train", "--resume", s(&out), "--iters", "30", "--objective", "orpo"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("objective dpo") && stderr(&o).contains("--resume-adapter-file"), "{}", stderr(&o));
    assert_matches_trl(&out, "dpo_sigmoid");
}

/// ORPO over a 4-bit base with gradient accumulation trains and reports its rewards; the
/// objectives refuse rows of the other kind, and packing, naming the file and line or the key.
#[test]
fn preference_runs_over_a_four_bit_base_and_refuse_what_does_not_fit() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("orpo4");
    let data = fixture("preference_reference").join("data");
    let model = fixture("llama");
    let base = ["train", "--model", s(&model), "--device", "cpu", "--batch-size", "2"];
    let o = lora(
        &[
            &base[..],
            &["--data", s(&data), "--adapter-path", s(&out), "--objective", "orpo", "--quantize", "nf4"],
            &["--grad-accumulation-steps", "2", "--iters", "4", "--steps-per-report", "2"],
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let reports = curve(&out, "rewards/accuracies");
    assert_eq!(reports.len(), 2, "{}", stderr(&o));
    assert!(curve(&out, "log_odds_ratio").iter().all(|(_, v)| v.is_finite() && *v < 0.0));

    let o = lora(&[&base[..], &["--data", s(&fixture("quickstart")), "--adapter-path", s(&tmp.path().join("a")), "--objective", "dpo"]].concat());
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("train.jsonl:1") && stderr(&o).contains("\"chosen\" and \"rejected\""), "{}", stderr(&o));
    let o = lora(&[&base[..], &["--data", s(&data), "--adapter-path", s(&tmp.path().join("b"))]].concat());
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--objective dpo or orpo"), "{}", stderr(&o));
    let o = lora(&[&base[..], &["--data", s(&data), "--adapter-path", s(&tmp.path().join("c")), "--objective", "dpo", "--pack"]].concat());
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("pack"), "{}", stderr(&o));
    assert!(!tmp.path().join("a").exists() && !tmp.path().join("b").exists() && !tmp.path().join("c").exists(), "refused runs write nothing");
}
