//! A broken deployment gets an error that names the file (and tensor or field) at fault:
//! never a panic, never code run from a pickle.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use gstllamavid::model::{LlamaVid, LoadOptions, ModelError, WeightFormat};

/// A writable copy of the fixture deployment (model dir, EVA, processor, bert).
struct Deployment {
    _root: tempfile::TempDir,
    model_dir: PathBuf,
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap();
            // Fixture files are read-only; the copies must be editable.
            let mut perms = fs::metadata(&target).unwrap().permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perms.set_readonly(false);
            fs::set_permissions(&target, perms).unwrap();
        }
    }
}

fn deployment() -> Deployment {
    let root = tempfile::tempdir().unwrap();
    copy_tree(&common::fixture_dir(), root.path());
    let model_dir = root.path().join(common::model_dir().file_name().unwrap());
    Deployment {
        _root: root,
        model_dir,
    }
}

fn load(model_dir: &Path, format: WeightFormat) -> Result<LlamaVid, ModelError> {
    let mut options = LoadOptions::new(model_dir);
    options.weight_format = format;
    LlamaVid::load(&options)
}

fn load_error(model_dir: &Path, format: WeightFormat) -> String {
    match load(model_dir, format) {
        Ok(_) => panic!("loading {} should fail", model_dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            message.contains(part),
            "error `{message}` should mention `{part}`"
        );
    }
}

fn eva_file(d: &Deployment) -> PathBuf {
    let config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(d.model_dir.join("config.json")).unwrap())
            .unwrap();
    let relative = config["mm_vision_tower"].as_str().unwrap();
    d.model_dir.parent().unwrap().join(relative)
}

fn shards(d: &Deployment) -> Vec<PathBuf> {
    let mut shards: Vec<PathBuf> = fs::read_dir(&d.model_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .collect();
    shards.sort();
    shards
}

fn truncate(path: &Path) {
    let len = fs::metadata(path).unwrap().len();
    let file = fs::OpenOptions::new().write(true).open(path).unwrap();
    file.set_len(len / 2).unwrap();
}

#[test]
fn the_fixture_copy_itself_loads() {
    let d = deployment();
    load(&d.model_dir, WeightFormat::Pickle).expect("an untouched copy loads");
}

#[test]
fn missing_model_directory() {
    let d = deployment();
    let missing = d.model_dir.join("nope");
    assert_mentions(
        &load_error(&missing, WeightFormat::Auto),
        &["model directory", "nope"],
    );
}

#[test]
fn directory_without_config() {
    let d = deployment();
    fs::remove_file(d.model_dir.join("config.json")).unwrap();
    assert_mentions(
        &load_error(&d.model_dir, WeightFormat::Auto),
        &["config.json"],
    );
}

#[test]
fn corrupt_config() {
    let d = deployment();
    fs::write(d.model_dir.join("config.json"), "{ not json").unwrap();
    assert_mentions(
        &load_error(&d.model_dir, WeightFormat::Auto),
        &["config.json", "JSON"],
    );
}

#[test]
fn missing_vision_tower() {
    let d = deployment();
    fs::remove_file(eva_file(&d)).unwrap();
    let message = load_error(&d.model_dir, WeightFormat::Auto);
    assert_mentions(&message, &["eva_vit_g.pth", "vision-tower"]);
}

#[test]
fn explicit_vision_tower_that_does_not_exist() {
    let d = deployment();
    let mut options = LoadOptions::new(&d.model_dir);
    options.vision_tower = Some(d.model_dir.join("elsewhere.pth"));
    let message = LlamaVid::load(&options)
        .err()
        .expect("must fail")
        .to_string();
    assert_mentions(&message, &["elsewhere.pth"]);
}

#[test]
fn truncated_vision_tower() {
    let d = deployment();
    truncate(&eva_file(&d));
    assert_mentions(
        &load_error(&d.model_dir, WeightFormat::Auto),
        &["eva_vit_g.pth"],
    );
}

#[test]
fn truncated_shard() {
    let d = deployment();
    let shard = shards(&d).pop().unwrap();
    truncate(&shard);
    let message = load_error(&d.model_dir, WeightFormat::Pickle);
    assert_mentions(&message, &[shard.file_name().unwrap().to_str().unwrap()]);
}

#[test]
fn missing_shard() {
    let d = deployment();
    let shard = shards(&d).remove(0);
    fs::remove_file(&shard).unwrap();
    let message = load_error(&d.model_dir, WeightFormat::Pickle);
    assert_mentions(
        &message,
        &[shard.file_name().unwrap().to_str().unwrap(), "not found"],
    );
}

/// A torch-style zip whose pickle would call `posix.system("touch <marker>")` if executed.
fn write_code_pickle(path: &Path, marker: &Path) {
    let command = format!("touch {}", marker.display());
    let mut pickle = b"\x80\x02cposix\nsystem\nq\x00X".to_vec();
    pickle.extend((command.len() as u32).to_le_bytes());
    pickle.extend(command.as_bytes());
    pickle.extend(b"q\x01\x85q\x02Rq\x03.");
    let mut zip = zip::ZipWriter::new(fs::File::create(path).unwrap());
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", options).unwrap();
    zip.write_all(&pickle).unwrap();
    zip.start_file("archive/version", options).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();
}

#[test]
fn pickle_carrying_code_is_refused_not_run() {
    let d = deployment();
    let shard = shards(&d).remove(0);
    let marker = d.model_dir.join("pwned");
    write_code_pickle(&shard, &marker);
    let message = load_error(&d.model_dir, WeightFormat::Pickle);
    assert_mentions(
        &message,
        &[
            shard.file_name().unwrap().to_str().unwrap(),
            "posix.system",
            "nothing was executed",
        ],
    );
    assert!(!marker.exists(), "the pickle's code ran");
}

fn rewrite_safetensors(
    d: &Deployment,
    edit: impl FnOnce(&mut std::collections::HashMap<String, Tensor>),
) {
    let path = d.model_dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut tensors);
    fs::remove_file(&path).unwrap();
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let d = deployment();
    let name = "model.vlm_att_key_projector.weight";
    rewrite_safetensors(&d, |t| {
        t.remove(name);
    });
    assert_mentions(
        &load_error(&d.model_dir, WeightFormat::Safetensors),
        &[name, "missing"],
    );
}

#[test]
fn wrong_shape_is_named() {
    let d = deployment();
    let name = "model.mm_projector.2.weight";
    rewrite_safetensors(&d, |t| {
        let w = t[name].clone();
        let cut = w.narrow(0, 0, w.dim(0).unwrap() - 1).unwrap();
        t.insert(name.to_owned(), cut);
    });
    assert_mentions(
        &load_error(&d.model_dir, WeightFormat::Safetensors),
        &[name, "shape"],
    );
}

#[test]
fn missing_qformer_vocab() {
    let d = deployment();
    fs::remove_file(
        d.model_dir
            .parent()
            .unwrap()
            .join("bert-base-uncased/vocab.txt"),
    )
    .unwrap();
    assert_mentions(
        &load_error(&d.model_dir, WeightFormat::Auto),
        &["vocab.txt", "bert-base-uncased"],
    );
}

#[test]
fn missing_tokenizer() {
    let d = deployment();
    for name in ["tokenizer.json", "tokenizer.model"] {
        let _ = fs::remove_file(d.model_dir.join(name));
    }
    assert_mentions(
        &load_error(&d.model_dir, WeightFormat::Auto),
        &["tokenizer.model"],
    );
}

#[test]
fn unknown_eva_head_count_asks_for_vision_config() {
    let d = deployment();
    let overrides = d.model_dir.join("vision_config.json");
    let config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&overrides).unwrap()).unwrap();
    fs::remove_file(&overrides).unwrap();
    match load(&d.model_dir, WeightFormat::Auto) {
        // A width that is a multiple of 88 is the real model's rule and loads.
        Ok(model) => assert_eq!(
            model.vision().config().num_heads * 88,
            model.vision().config().width
        ),
        Err(e) => {
            assert_mentions(&e.to_string(), &["vision_config.json", "num_heads"]);
            assert!(config["num_heads"].is_number());
        }
    }
}

#[test]
fn bf16_weights_load_and_upcast() {
    let d = deployment();
    rewrite_safetensors(&d, |t| {
        for tensor in t.values_mut() {
            if tensor.dtype() == DType::F32 {
                *tensor = tensor.to_dtype(DType::BF16).unwrap();
            }
        }
    });
    let model = load(&d.model_dir, WeightFormat::Safetensors).expect("bf16 weights load");
    let reference = common::reference();
    let prompt = model
        .prompt(common::prompt_json()["question"].as_str().unwrap())
        .unwrap();
    let tokens = model
        .encode_pixels(&reference["pixel_values"], &prompt)
        .unwrap();
    assert_eq!(tokens.dtype(), DType::F32, "compute dtype stays f32");
    let video = tokens.reshape((tokens.dim(0).unwrap() * 2, ())).unwrap();
    // bf16 keeps 8 bits of mantissa: the tokens move, but stay near the f32 ones.
    common::assert_close(
        "video_tokens (bf16 weights)",
        &video,
        &reference["video_tokens"],
        5e-2,
    );
}

/// The EVA weights of the deployment rewritten as `eva.safetensors` beside them, with `edit`
/// applied; returns the options that load the model with that vision tower.
fn rewritten_eva(
    d: &Deployment,
    edit: impl FnOnce(&mut std::collections::HashMap<String, Tensor>),
) -> LoadOptions {
    let mut tensors: std::collections::HashMap<String, Tensor> =
        candle_core::pickle::read_all(eva_file(d))
            .unwrap()
            .into_iter()
            .collect();
    edit(&mut tensors);
    let path = d.model_dir.join("eva.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let mut options = LoadOptions::new(&d.model_dir);
    options.vision_tower = Some(path);
    options
}

/// Issue 9 item 4: every tensor whose dimensions the loader reads to size the model, at a rank
/// it does not expect (a scalar, a vector where a matrix belongs), is an error naming it.
#[test]
fn tensors_of_an_unexpected_rank_are_named_not_panicked_on() {
    let scalar = || Tensor::new(1f32, &Device::Cpu).unwrap();
    let vector = || Tensor::zeros(64, DType::F32, &Device::Cpu).unwrap();
    // In the HF checkpoint.
    let word_embeddings = "model.vlm_att_encoder.bert.embeddings.word_embeddings.weight";
    for (rank, make) in [
        ("scalar", &scalar as &dyn Fn() -> Tensor),
        ("vector", &vector),
    ] {
        let d = deployment();
        rewrite_safetensors(&d, |t| {
            t.insert(word_embeddings.to_owned(), make());
        });
        let message = load_error(&d.model_dir, WeightFormat::Safetensors);
        assert_mentions(&message, &[word_embeddings, "shape"]);
        println!("{rank}: {message}");
    }
    // In the vision tower.
    for name in [
        "blocks.0.mlp.fc1.weight",
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
    ] {
        for make in [&scalar as &dyn Fn() -> Tensor, &vector] {
            let d = deployment();
            let options = rewritten_eva(&d, |t| {
                t.insert(name.to_owned(), make());
            });
            let message = match LlamaVid::load(&options) {
                Ok(_) => panic!("{name} of rank {} loaded", make().rank()),
                Err(e) => e.to_string(),
            };
            assert_mentions(&message, &[name, "eva.safetensors"]);
        }
    }
}

#[test]
fn the_rewritten_vision_tower_itself_loads() {
    // The control for the test above: the same rewrite without damage loads.
    let d = deployment();
    let options = rewritten_eva(&d, |_| {});
    LlamaVid::load(&options).expect("an untouched EVA in safetensors loads");
}
