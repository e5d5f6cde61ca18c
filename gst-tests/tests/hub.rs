//! Models from the hub, through `HubMirrorDouble` (a test double of the hub on 127.0.0.1):
//! no test here reaches the real hub. The fetch API gets explicit configurations (tests run in
//! parallel threads, so the environment is never changed); the element runs in gst-launch-1.0
//! child processes given HF_ENDPOINT and HF_HOME.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use gstllamavid::hub::{
    FetchError, FetchEvent, FetchedModel, Hub, HubConfig, ModelRequest, VisionTowerSource,
    LAVIS_EVA_URL,
};
use gstllamavid::model::{LlamaVid, LoadOptions};
use llamavid_gst_tests::hub_mirror::FixtureHub;
use llamavid_gst_tests::*;
use sha2::{Digest, Sha256};

const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

fn config(home: &Path, hub: &FixtureHub) -> HubConfig {
    let mut config = HubConfig::in_dir(home, hub.mirror.endpoint());
    config.timeout = Duration::from_secs(20);
    config
}

/// Every event, as text, for assertions.
#[derive(Default)]
struct Events(Mutex<Vec<String>>);

impl Events {
    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

impl gstllamavid::hub::FetchObserver for Events {
    fn event(&self, event: &FetchEvent<'_>) {
        self.0.lock().unwrap().push(format!("{event:?}"));
    }
}

fn fetch_with(
    config: &HubConfig,
    model: &str,
    vision_tower: Option<&str>,
    events: &Events,
) -> Result<FetchedModel, FetchError> {
    let hub = Hub::new(config.clone()).expect("hub client");
    let request = ModelRequest::parse(model, vision_tower).expect("valid request");
    hub.fetch_model(&request, events)
}

fn fetch(
    config: &HubConfig,
    model: &str,
    vision_tower: Option<&str>,
) -> Result<FetchedModel, FetchError> {
    fetch_with(config, model, vision_tower, &Events::default())
}

fn sha256(path: &Path) -> String {
    format!(
        "{:x}",
        Sha256::digest(std::fs::read(path).expect("read file"))
    )
}

/// The blob a snapshot file points to.
fn blob_of(model_dir: &Path, file: &str) -> PathBuf {
    model_dir.join(file).canonicalize().expect("snapshot link")
}

/// Downloads of `file` from the repository (or URL folder) `from`.
fn downloads_from(hub: &FixtureHub, from: &str, file: &str) -> usize {
    hub.mirror
        .downloads()
        .iter()
        .filter(|r| r.path.starts_with(&format!("/{from}/")) && r.is_for(file))
        .count()
}

/// Downloads of `file` of the model repository.
fn downloads_of(hub: &FixtureHub, file: &str) -> usize {
    downloads_from(hub, &hub.model_id, file)
}

#[test]
fn a_hub_id_downloads_once_into_the_standard_cache_and_then_needs_no_request() {
    let hub = FixtureHub::start();
    let home = tempfile::tempdir().unwrap();
    let config = config(home.path(), &hub);
    let events = Events::default();
    let fetched = fetch_with(&config, &hub.model_id, Some(&hub.eva_url), &events).unwrap();

    // huggingface_hub's layout: refs/main, snapshots/{commit}/ links into blobs/.
    let repo_dir = home.path().join("hub/models--test--llama-vid-tiny-video");
    assert_eq!(
        fetched.model_dir,
        repo_dir.join("snapshots").join(&hub.commit)
    );
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        hub.commit
    );
    let config_link = std::fs::read_link(fetched.model_dir.join("config.json")).unwrap();
    assert!(config_link.starts_with("../../blobs"), "{config_link:?}");
    assert_eq!(
        fetched.pinned.as_ref().map(ToString::to_string),
        Some(hub.pinned_id())
    );

    // Exactly the fixture's files, each downloaded once; one copy of the weights only.
    let model_dir = model_dir();
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.model",
        "vision_config.json",
    ] {
        assert_eq!(
            sha256(&fetched.model_dir.join(file)),
            sha256(&model_dir.join(file)),
            "{file}"
        );
        assert_eq!(downloads_of(&hub, file), 1, "{file}");
    }
    assert!(
        !fetched
            .model_dir
            .join("pytorch_model-00001-of-00002.bin")
            .exists(),
        "the safetensors copy is enough"
    );
    let fixture = fixture_dir();
    let bert = fetched.bert_dir.clone().unwrap();
    assert!(bert.starts_with(
        home.path()
            .join("hub/models--google-bert--bert-base-uncased")
    ));
    assert_eq!(
        sha256(&bert.join("vocab.txt")),
        sha256(&fixture.join("bert-base-uncased/vocab.txt"))
    );
    let eva = fetched.vision_tower.clone().unwrap();
    assert!(
        eva.starts_with(home.path().join("assets/gst-llamavid/urls")),
        "{eva:?}"
    );
    assert_eq!(
        sha256(&eva),
        sha256(&fixture.join("model_zoo/LAVIS/eva_vit_g.pth"))
    );
    // The plan was announced with its bytes, and the bytes counted up to it.
    let all = events.all();
    assert!(all.iter().any(|e| e.starts_with("Plan")), "{all:?}");
    assert!(all.iter().any(|e| e.starts_with("Bytes")), "{all:?}");

    // The loader takes the fetched files.
    let mut options = LoadOptions::new(&fetched.model_dir);
    options.vision_tower = fetched.vision_tower.clone();
    options.bert_dir = fetched.bert_dir.clone();
    let model = LlamaVid::load(&options).expect("the fetched model loads");
    assert_eq!(model.files().vision_tower, eva);

    // Pinned and cached: no request at all.
    hub.mirror.clear_log();
    let again = fetch(&config, &hub.pinned_id(), Some(&hub.eva_url)).unwrap();
    assert_eq!(again, fetched);
    assert_eq!(
        hub.mirror.requests(),
        vec![],
        "a pinned cached model asks nothing"
    );

    // A branch: one question (where does main point?), no download.
    hub.mirror.clear_log();
    let branch = fetch(&config, &hub.model_id, Some(&hub.eva_url)).unwrap();
    assert_eq!(branch.model_dir, fetched.model_dir);
    let requests = hub.mirror.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert!(requests[0]
        .path
        .starts_with("/api/models/test/llama-vid-tiny-video/revision/main"));
}

#[test]
fn offline_mode_uses_the_cache_only_and_names_what_is_missing() {
    let hub = FixtureHub::start();
    let home = tempfile::tempdir().unwrap();
    let mut offline = config(home.path(), &hub);
    offline.offline = true;
    let e = fetch(&offline, &hub.pinned_id(), Some(&hub.eva_url)).unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, FetchError::Offline { .. }), "{e:?}");
    assert!(
        text.contains("test/llama-vid-tiny-video") && text.contains("config.json"),
        "{text}"
    );
    assert!(text.contains("HF_HUB_OFFLINE=1"), "{text}");
    let e = fetch(&offline, &hub.model_id, None).unwrap_err();
    assert!(e.to_string().contains("revision main"), "{e}");
    assert_eq!(hub.mirror.requests(), vec![], "offline mode asks nothing");

    let online = fetch(
        &config(home.path(), &hub),
        &hub.model_id,
        Some(&hub.eva_url),
    )
    .unwrap();
    hub.mirror.clear_log();
    let cached = fetch(&offline, &hub.model_id, Some(&hub.eva_url)).unwrap();
    assert_eq!(cached, online, "the branch's cached commit is used");
    assert_eq!(hub.mirror.requests(), vec![]);

    // A hub model without vision-tower takes EVA from the LAVIS URL: offline, that URL is
    // named as what is missing.
    let e = fetch(&offline, &hub.model_id, None).unwrap_err();
    assert!(e.to_string().contains(LAVIS_EVA_URL), "{e}");
    assert_eq!(hub.mirror.requests(), vec![]);
}

#[test]
fn an_interrupted_download_resumes_where_it_stopped() {
    let hub = FixtureHub::start();
    let home = tempfile::tempdir().unwrap();
    let size = std::fs::metadata(model_dir().join("model.safetensors"))
        .unwrap()
        .len();
    let cut = size / 3;
    hub.mirror.cut_next_download("model.safetensors", cut);
    let events = Events::default();
    let fetched = fetch_with(
        &config(home.path(), &hub),
        &hub.model_id,
        Some(&hub.eva_url),
        &events,
    )
    .unwrap();
    assert_eq!(
        sha256(&fetched.model_dir.join("model.safetensors")),
        sha256(&model_dir().join("model.safetensors"))
    );
    let ranges: Vec<Option<String>> = hub
        .mirror
        .downloads()
        .into_iter()
        .filter(|r| r.is_for("model.safetensors"))
        .map(|r| r.range)
        .collect();
    assert_eq!(ranges, vec![None, Some(format!("bytes={cut}-"))]);
    assert!(
        events.all().iter().any(|e| e.contains("trying again")),
        "{:?}",
        events.all()
    );
}

#[test]
fn a_partial_download_left_by_an_earlier_process_is_resumed() {
    let hub = FixtureHub::start();
    let home = tempfile::tempdir().unwrap();
    let weights = std::fs::read(model_dir().join("model.safetensors")).unwrap();
    let etag = format!("{:x}", Sha256::digest(&weights));
    let blobs = home
        .path()
        .join("hub/models--test--llama-vid-tiny-video/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let half = weights.len() / 2;
    std::fs::write(blobs.join(format!("{etag}.incomplete")), &weights[..half]).unwrap();
    let fetched = fetch(
        &config(home.path(), &hub),
        &hub.model_id,
        Some(&hub.eva_url),
    )
    .unwrap();
    assert_eq!(
        std::fs::read(fetched.model_dir.join("model.safetensors")).unwrap(),
        weights
    );
    let ranges: Vec<Option<String>> = hub
        .mirror
        .downloads()
        .into_iter()
        .filter(|r| r.is_for("model.safetensors"))
        .map(|r| r.range)
        .collect();
    assert_eq!(ranges, vec![Some(format!("bytes={half}-"))]);
    assert!(!blobs.join(format!("{etag}.incomplete")).exists());
}

#[test]
fn a_damaged_cached_file_is_fetched_again_never_loaded() {
    let hub = FixtureHub::start();
    let home = tempfile::tempdir().unwrap();
    let config = config(home.path(), &hub);
    let fetched = fetch(&config, &hub.pinned_id(), Some(&hub.eva_url)).unwrap();
    let good = sha256(&model_dir().join("model.safetensors"));

    // Same size, one byte changed.
    let blob = blob_of(&fetched.model_dir, "model.safetensors");
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&blob, &bytes).unwrap();
    hub.mirror.clear_log();
    let again = fetch(&config, &hub.pinned_id(), Some(&hub.eva_url)).unwrap();
    assert_eq!(sha256(&again.model_dir.join("model.safetensors")), good);
    assert_eq!(downloads_of(&hub, "model.safetensors"), 1);
    assert_eq!(
        hub.mirror.downloads().len(),
        1,
        "{:?}",
        hub.mirror.downloads()
    );

    // Truncated.
    let file = std::fs::OpenOptions::new().write(true).open(&blob).unwrap();
    file.set_len(100).unwrap();
    drop(file);
    hub.mirror.clear_log();
    fetch(&config, &hub.pinned_id(), Some(&hub.eva_url)).unwrap();
    assert_eq!(sha256(&blob), good);
    assert_eq!(downloads_of(&hub, "model.safetensors"), 1);

    // The EVA file from a URL is held to its recorded hash too.
    let eva = again.vision_tower.clone().unwrap();
    let mut bytes = std::fs::read(&eva).unwrap();
    bytes[10] ^= 0xff;
    std::fs::write(&eva, &bytes).unwrap();
    hub.mirror.clear_log();
    fetch(&config, &hub.pinned_id(), Some(&hub.eva_url)).unwrap();
    assert_eq!(downloads_from(&hub, "files/LAVIS", "eva_vit_g.pth"), 1);

    // Offline, a damaged file is an error, not a load.
    std::fs::write(&blob, vec![0u8; bytes.len().min(10)]).unwrap();
    let mut offline = config.clone();
    offline.offline = true;
    let e = fetch(&offline, &hub.pinned_id(), Some(&hub.eva_url)).unwrap_err();
    assert!(matches!(e, FetchError::DamagedOffline { .. }), "{e:?}");
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}

#[test]
fn damaged_downloads_are_fetched_again_and_never_kept() {
    let hub = FixtureHub::start();
    let home = tempfile::tempdir().unwrap();
    hub.mirror.corrupt_next_downloads("model.safetensors", 1);
    let fetched = fetch(
        &config(home.path(), &hub),
        &hub.model_id,
        Some(&hub.eva_url),
    )
    .unwrap();
    assert_eq!(
        sha256(&fetched.model_dir.join("model.safetensors")),
        sha256(&model_dir().join("model.safetensors"))
    );
    assert_eq!(downloads_of(&hub, "model.safetensors"), 2);

    let home = tempfile::tempdir().unwrap();
    hub.mirror.corrupt_next_downloads("model.safetensors", 10);
    let e = fetch(
        &config(home.path(), &hub),
        &hub.model_id,
        Some(&hub.eva_url),
    )
    .unwrap_err();
    assert!(matches!(e, FetchError::Corrupt { .. }), "{e:?}");
    assert!(
        e.to_string().contains("test/llama-vid-tiny-video")
            && e.to_string().contains("model.safetensors"),
        "{e}"
    );
    let snapshot = home
        .path()
        .join("hub/models--test--llama-vid-tiny-video/snapshots")
        .join(&hub.commit);
    assert!(
        !snapshot.join("model.safetensors").exists(),
        "nothing damaged is kept"
    );
}

#[test]
fn gated_repositories_say_to_log_in_and_accept_a_token() {
    let hub = FixtureHub::start();
    hub.mirror.require_token(&hub.model_id, "hf_secret");
    let home = tempfile::tempdir().unwrap();
    let mut config = config(home.path(), &hub);
    let e = fetch(&config, &hub.model_id, Some(&hub.eva_url)).unwrap_err();
    assert!(matches!(e, FetchError::Denied { status: 401, .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.contains("test/llama-vid-tiny-video"), "{text}");
    assert!(
        text.contains("HF_TOKEN") && text.contains("huggingface-cli login"),
        "{text}"
    );

    config.token = Some("hf_wrong".into());
    let e = fetch(&config, &hub.model_id, Some(&hub.eva_url)).unwrap_err();
    assert!(matches!(e, FetchError::Denied { status: 403, .. }), "{e:?}");

    config.token = Some("hf_secret".into());
    fetch(&config, &hub.model_id, Some(&hub.eva_url)).unwrap();
    // The token goes to the hub only, never with a plain URL download.
    for request in hub.mirror.requests() {
        if request.path.starts_with("/files/") {
            assert_eq!(request.token, None, "{request:?}");
        }
    }
}

#[test]
fn unknown_repositories_revisions_and_files_are_named() {
    let hub = FixtureHub::start();
    let home = tempfile::tempdir().unwrap();
    let config = config(home.path(), &hub);
    let cases: [(String, String, &str); 4] = [
        (
            "test/no-such-model".into(),
            hub.eva_url.clone(),
            "test/no-such-model",
        ),
        (
            format!("{}@no-such-branch", hub.model_id),
            hub.eva_url.clone(),
            "no-such-branch",
        ),
        (
            hub.model_id.clone(),
            "test/eva-vit-g/missing.pth".into(),
            "missing.pth",
        ),
        (
            hub.model_id.clone(),
            format!("{}/files/missing.pth", hub.mirror.endpoint()),
            "missing.pth",
        ),
    ];
    for (model, vision, named) in cases {
        let e = fetch(&config, &model, Some(&vision)).unwrap_err();
        assert!(
            matches!(e, FetchError::NotFound { .. }),
            "{model} {vision}: {e:?}"
        );
        let text = e.to_string();
        assert!(text.contains(named) && text.contains("404"), "{text}");
    }
}

#[test]
fn concurrent_loads_of_one_id_download_each_file_once() {
    let hub = FixtureHub::start();
    let home = tempfile::tempdir().unwrap();
    let config = config(home.path(), &hub);
    let results: Vec<FetchedModel> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| fetch(&config, &hub.model_id, Some(&hub.eva_url)).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(results.windows(2).all(|w| w[0] == w[1]));
    for file in ["config.json", "model.safetensors", "tokenizer.model"] {
        assert_eq!(
            downloads_of(&hub, file),
            1,
            "{file}: {:?}",
            hub.mirror.downloads()
        );
    }
    for (from, file) in [
        ("google-bert/bert-base-uncased", "vocab.txt"),
        ("files/LAVIS", "eva_vit_g.pth"),
    ] {
        assert_eq!(
            downloads_from(&hub, from, file),
            1,
            "{file}: {:?}",
            hub.mirror.downloads()
        );
    }
}

#[test]
fn no_network_is_reported_and_a_cached_branch_still_loads() {
    let hub = FixtureHub::start();
    let home = tempfile::tempdir().unwrap();
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let mut unreachable = HubConfig::in_dir(home.path(), &dead);
    unreachable.timeout = Duration::from_secs(5);
    let e = fetch(&unreachable, &hub.model_id, Some(&hub.eva_url)).unwrap_err();
    assert!(matches!(e, FetchError::Network { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("cannot reach") && text.contains("test/llama-vid-tiny-video"),
        "{text}"
    );

    let online = fetch(
        &config(home.path(), &hub),
        &hub.model_id,
        Some(&hub.eva_url),
    )
    .unwrap();
    let events = Events::default();
    let cached = fetch_with(&unreachable, &hub.model_id, Some(&hub.eva_url), &events).unwrap();
    assert_eq!(cached.model_dir, online.model_dir);
    assert!(
        events
            .all()
            .iter()
            .any(|e| e.contains("using the cached commit")),
        "{:?}",
        events.all()
    );
}

#[test]
fn the_vision_tower_can_be_a_hub_file_or_a_url_with_its_sha256() {
    let hub = FixtureHub::start();
    let home = tempfile::tempdir().unwrap();
    let config = config(home.path(), &hub);
    let fetched = fetch(&config, &hub.model_id, Some(&hub.eva_hub_file)).unwrap();
    let eva = fetched.vision_tower.unwrap();
    assert!(eva.starts_with(home.path().join("hub/models--test--eva-vit-g/snapshots")));
    let expected = sha256(&fixture_dir().join("model_zoo/LAVIS/eva_vit_g.pth"));
    assert_eq!(sha256(&eva), expected);

    let client = Hub::new(config.clone()).unwrap();
    let pinned = VisionTowerSource::parse(&format!("{}#sha256={expected}", hub.eva_url)).unwrap();
    let path = client.fetch_vision_tower(&pinned, &()).unwrap();
    assert_eq!(sha256(&path), expected);
    hub.mirror.clear_log();
    client.fetch_vision_tower(&pinned, &()).unwrap();
    assert_eq!(
        hub.mirror.requests(),
        vec![],
        "a cached URL file asks nothing"
    );

    let wrong =
        VisionTowerSource::parse(&format!("{}#sha256={}", hub.eva_url, "0".repeat(64))).unwrap();
    let other_home = tempfile::tempdir().unwrap();
    let client = Hub::new(HubConfig::in_dir(other_home.path(), hub.mirror.endpoint())).unwrap();
    let e = client.fetch_vision_tower(&wrong, &()).unwrap_err();
    assert!(matches!(e, FetchError::Corrupt { .. }), "{e:?}");
}

// ---------------------------------------------------------------------------------------------
// The element, in gst-launch-1.0 child processes
// ---------------------------------------------------------------------------------------------

fn launch_caption(hub: &FixtureHub, env: &[(String, String)], model: &str) -> ToolOutput {
    let args = [
        "-m".to_owned(),
        "videotestsrc".into(),
        "num-buffers=12".into(),
        "!".into(),
        "video/x-raw,width=64,height=48,framerate=10/1".into(),
        "!".into(),
        "llamavidcaption".into(),
        "name=c".into(),
        format!("model={model}"),
        format!("vision-tower={}", hub.eva_url),
        "device=cpu".into(),
        "sample-interval=100".into(),
        "caption-interval=500".into(),
        "max-new-tokens=4".into(),
        "!".into(),
        "fakesink".into(),
        "c.text_src".into(),
        "!".into(),
        "fakesink".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    gst_tool_with_env("gst-launch-1.0", &args, env, TOOL_TIMEOUT)
}

#[test]
fn the_element_loads_a_hub_id_through_hf_endpoint_with_progress_messages() {
    let hub = FixtureHub::start();
    let home = tempfile::tempdir().unwrap();
    let env = hub.env(home.path());
    let output = launch_caption(&hub, &env, &hub.model_id);
    assert!(output.success, "{}", output.all());
    let stdout = &output.stdout;
    assert!(
        stdout.contains(&format!("(element): {CAPTION_MESSAGE}, ")),
        "no caption:\n{stdout}"
    );
    // Progress messages with the percent and the bytes in the text.
    // gst-launch escapes spaces and punctuation in strings.
    let progress: Vec<String> = stdout
        .lines()
        .filter(|l| l.contains("(progress)") && l.contains("code=(string)download"))
        .map(|l| l.replace('\\', ""))
        .collect();
    assert!(
        progress
            .iter()
            .any(|l| l.contains("percent=(int)100") && l.contains("all files 100% of ")),
        "{progress:#?}"
    );
    assert!(
        progress
            .iter()
            .any(|l| l.contains("model.safetensors: ") && l.contains("% (") && l.contains(" MB")),
        "{progress:#?}"
    );
    assert!(
        progress.iter().any(
            |l| l.contains("type=(GstProgressType)GST_PROGRESS_TYPE_COMPLETE")
                || l.contains("type=(GstProgressType)complete")
        ),
        "{progress:#?}"
    );

    // A second run of the pinned id asks the hub nothing.
    hub.mirror.clear_log();
    let output = launch_caption(&hub, &env, &hub.pinned_id());
    assert!(output.success, "{}", output.all());
    assert_eq!(hub.mirror.requests(), vec![]);
}

#[test]
fn the_element_reports_hub_errors_a_user_can_act_on() {
    let hub = FixtureHub::start();
    hub.mirror.require_token(&hub.model_id, "hf_secret");
    let home = tempfile::tempdir().unwrap();
    let mut env = hub.env(home.path());

    let output = launch_caption(&hub, &env, "test/no-such-model");
    assert!(!output.success);
    let all = output.all();
    assert!(
        all.contains("test/no-such-model") && all.contains("404"),
        "{all}"
    );

    let output = launch_caption(&hub, &env, &hub.model_id);
    assert!(!output.success);
    assert!(output.all().contains("HF_TOKEN"), "{}", output.all());

    env.push(("HF_HUB_OFFLINE".into(), "1".into()));
    let output = launch_caption(&hub, &env, &hub.model_id);
    assert!(!output.success);
    assert!(
        output.all().contains("HF_HUB_OFFLINE=1"),
        "{}",
        output.all()
    );
    env.pop();

    env.push(("HF_TOKEN".into(), "hf_secret".into()));
    let output = launch_caption(&hub, &env, &hub.model_id);
    assert!(output.success, "{}", output.all());
}
