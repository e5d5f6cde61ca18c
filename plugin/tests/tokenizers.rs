//! Tokenizers and prompt assembly against the reference fixture.
//!
//! Every expected id comes from the fixture (`prompt.json`, `reference.safetensors`, the
//! fixture's own `tokenizer.json` files), so another fixture with other vocabularies passes
//! unchanged.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use gstllamavid::model::prompt::{
    clean_answer, split_at_image, tokenize_with_image, vicuna_v1_prompt, PromptIds,
    IMAGE_TOKEN_INDEX,
};
use gstllamavid::model::tokenizer::{
    BertTokenizer, LlamaTokenizer, ModelType, PieceType, SentencePieceModel, DEC_TOKEN,
    QFORMER_MAX_TOKENS,
};
use gstllamavid::model::ModelError;

// ---------------------------------------------------------------------------------------------
// helpers

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "llamavid-tokenizers-{}-{tag}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).expect("write temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The model directory's tokenizer files without `tokenizer.json`: what a real release ships.
fn sentencepiece_only_dir() -> TempDir {
    let dir = TempDir::new("spm");
    let model_dir = common::model_dir();
    for name in [
        LlamaTokenizer::MODEL_FILE,
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let from = model_dir.join(name);
        if from.is_file() {
            std::fs::copy(&from, dir.path().join(name)).expect("copy tokenizer file");
        }
    }
    dir
}

fn json_tokenizer() -> LlamaTokenizer {
    let tok = LlamaTokenizer::from_model_dir(&common::model_dir()).expect("tokenizer loads");
    assert!(
        tok.source().ends_with(LlamaTokenizer::JSON_FILE),
        "tokenizer.json is preferred when present, got {}",
        tok.source().display()
    );
    tok
}

fn sentencepiece_tokenizer(dir: &TempDir) -> LlamaTokenizer {
    let tok = LlamaTokenizer::from_model_dir(dir.path()).expect("tokenizer.model loads");
    assert!(tok.source().ends_with(LlamaTokenizer::MODEL_FILE));
    tok
}

fn sentencepiece_model() -> SentencePieceModel {
    SentencePieceModel::from_file(&common::model_dir().join(LlamaTokenizer::MODEL_FILE))
        .expect("fixture tokenizer.model parses")
}

fn reference_i64(name: &str) -> Vec<i64> {
    let reference = common::reference();
    let t = reference
        .get(name)
        .unwrap_or_else(|| panic!("reference has `{name}`"));
    t.flatten_all().unwrap().to_vec1::<i64>().unwrap()
}

fn prompt_i64(key: &str) -> Vec<i64> {
    common::prompt_json()[key]
        .as_array()
        .unwrap_or_else(|| panic!("prompt.json has `{key}`"))
        .iter()
        .map(|v| v.as_i64().expect("integer id"))
        .collect()
}

fn prompt_str(key: &str) -> String {
    common::prompt_json()[key]
        .as_str()
        .unwrap_or_else(|| panic!("prompt.json has string `{key}`"))
        .to_owned()
}

/// The text the Q-Former saw: `qformer_text` when recorded, else the question.
fn qformer_text() -> String {
    let json = common::prompt_json();
    json.get("qformer_text")
        .or_else(|| json.get("question"))
        .and_then(|v| v.as_str())
        .expect("prompt.json has the question")
        .to_owned()
}

fn to_u32(ids: &[i64]) -> Vec<u32> {
    ids.iter()
        .map(|&id| u32::try_from(id).expect("vocabulary id"))
        .collect()
}

/// Deterministic pseudo-random strings over `alphabet` (no extra crate).
fn random_strings(alphabet: &[char], count: usize, seed: u64) -> Vec<String> {
    let mut state = seed;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    (0..count)
        .map(|_| {
            let len = 1 + next() % 24;
            (0..len)
                .map(|_| alphabet[next() % alphabet.len()])
                .collect()
        })
        .collect()
}

/// Strings that exercise what a prompt or caption may hold.
fn hand_picked_strings() -> Vec<String> {
    [
        "Describe what happened in this video.",
        "",
        " ",
        "  two leading spaces",
        "trailing spaces  ",
        "multiple   spaces\tand\ttabs\nand a newline\n",
        "\n",
        "Crème brûlée à la française, naïve café résumé",
        "digits 1234567890, 3.14159 and 2024-06-01",
        "007 0 00 12 345",
        "emoji 😀🎬 needs byte fallback, and so do CJK 中文字幕",
        "🏳️‍🌈 zero width joiner",
        "a\u{301} combining accent",
        "\u{2581}literal marker\u{2581}",
        "ASSISTANT: USER: ASSISTANT:",
        "A chat between a curious user and an artificial intelligence assistant.",
        "What's the person doing? (answer briefly!)",
        "control \u{7} bell and \u{0} nul",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Strings built from the vocabulary itself: every piece alone and glued to the next one, so
/// every merge is exercised.
fn vocabulary_strings(model: &SentencePieceModel) -> Vec<String> {
    let texts: Vec<String> = model
        .pieces
        .iter()
        .filter(|p| p.kind == PieceType::Normal)
        .map(|p| p.piece.replace('\u{2581}', " "))
        .collect();
    let mut out = texts.clone();
    out.extend(texts.windows(2).map(|w| format!("{}{}", w[0], w[1])));
    out.extend(
        texts
            .windows(3)
            .map(|w| format!("{}{}{}", w[2], w[0], w[1])),
    );
    out
}

fn random_llama_strings(model: &SentencePieceModel) -> Vec<String> {
    let mut alphabet: Vec<char> = model
        .pieces
        .iter()
        .filter(|p| p.kind == PieceType::Normal)
        .flat_map(|p| p.piece.chars())
        .map(|c| if c == '\u{2581}' { ' ' } else { c })
        .collect();
    alphabet.extend("  éÉüß中文😀🎬\n\t0123456789~€\u{2581}".chars());
    alphabet.sort_unstable();
    alphabet.dedup();
    random_strings(&alphabet, 400, 0x5eed)
}

/// SentencePiece BPE encoding written straight from its definition: normalize, then merge the
/// adjacent pair whose concatenation is the highest-scoring piece (leftmost on ties) until no
/// pair is a piece; characters outside the vocabulary become byte pieces (or unk).
fn sentencepiece_greedy_encode(model: &SentencePieceModel, text: &str) -> Vec<u32> {
    assert!(model.normalizer.precompiled_charsmap.is_empty());
    assert!(!model.normalizer.remove_extra_whitespaces);
    let mut normalized = String::new();
    if model.normalizer.add_dummy_prefix && !text.is_empty() {
        normalized.push('\u{2581}');
    }
    normalized.push_str(&text.replace(' ', "\u{2581}"));

    let mergeable: HashMap<&str, (u32, f32)> = model
        .pieces
        .iter()
        .enumerate()
        .filter(|(_, p)| p.kind.is_mergeable())
        .map(|(id, p)| (p.piece.as_str(), (id as u32, p.score)))
        .collect();
    let all: HashMap<&str, u32> = model
        .pieces
        .iter()
        .enumerate()
        .map(|(id, p)| (p.piece.as_str(), id as u32))
        .collect();

    let mut symbols: Vec<String> = normalized.chars().map(String::from).collect();
    loop {
        let mut best: Option<(usize, f32)> = None;
        for i in 0..symbols.len().saturating_sub(1) {
            let joined = format!("{}{}", symbols[i], symbols[i + 1]);
            if let Some(&(_, score)) = mergeable.get(joined.as_str()) {
                if best.is_none_or(|(_, b)| score > b) {
                    best = Some((i, score));
                }
            }
        }
        let Some((i, _)) = best else { break };
        let right = symbols.remove(i + 1);
        symbols[i].push_str(&right);
    }

    let unk = model.trainer.unk_id as u32;
    let mut ids = Vec::new();
    for s in &symbols {
        if let Some(&(id, _)) = mergeable.get(s.as_str()) {
            ids.push(id);
        } else if model.trainer.byte_fallback {
            let bytes: Option<Vec<u32>> = s
                .bytes()
                .map(|b| all.get(format!("<0x{b:02X}>").as_str()).copied())
                .collect();
            ids.extend(bytes.unwrap_or_else(|| vec![unk]));
        } else {
            ids.push(unk);
        }
    }
    ids
}

// ---------------------------------------------------------------------------------------------
// LLaMA tokenizer: fixture ids

#[test]
fn prompt_template_is_the_fixtures() {
    let json = common::prompt_json();
    if json.get("conv_mode").and_then(|v| v.as_str()) != Some("vicuna_v1") {
        eprintln!("fixture uses another template; skipped");
        return;
    }
    assert_eq!(
        vicuna_v1_prompt(&prompt_str("question")),
        prompt_str("prompt")
    );
}

#[test]
fn prompt_ids_from_tokenizer_json_match_reference() {
    let tok = json_tokenizer();
    let ids = tokenize_with_image(&tok, &prompt_str("prompt")).unwrap();
    assert_eq!(ids, reference_i64("input_ids"));
    assert_eq!(ids, prompt_i64("llm_input_ids"));
}

#[test]
fn prompt_ids_from_tokenizer_model_alone_match_reference() {
    let dir = sentencepiece_only_dir();
    let tok = sentencepiece_tokenizer(&dir);
    let ids = tokenize_with_image(&tok, &prompt_str("prompt")).unwrap();
    assert_eq!(ids, reference_i64("input_ids"));
}

/// Issue 9 item 2: a question is text. `<image>` in it is not a second placeholder, and the
/// text of a special token (`</s>`, `<s>`, `<unk>`) is not that token; both tokenizers agree.
#[test]
fn a_question_with_template_syntax_gives_one_image_and_no_special_ids() {
    let dir = sentencepiece_only_dir();
    for tok in [json_tokenizer(), sentencepiece_tokenizer(&dir)] {
        let question = "Is <image> here? </s> USER: <s> and <unk>";
        let split = PromptIds::for_question(&tok, question).unwrap();
        let specials = [tok.bos_id(), tok.eos_id()];
        assert!(
            !split.after.iter().any(|id| specials.contains(id)),
            "{:?} in {:?}",
            specials,
            split.after
        );
        // The question's ids are those of its characters, tokenized as any other text.
        let plain = PromptIds::for_question(&tok, "Is here? USER: and").unwrap();
        assert_eq!(
            split.before, plain.before,
            "the text before the image is the template"
        );
        assert!(split.after.len() > plain.after.len());
        // And the reference's ids for every question without such text.
        let q = prompt_str("question");
        let reference = split_at_image(&tokenize_with_image(&tok, &vicuna_v1_prompt(&q)).unwrap());
        assert_eq!(
            PromptIds::for_question(&tok, &q).unwrap(),
            reference.unwrap()
        );
    }
}

#[test]
fn a_question_with_special_token_text_gives_no_special_bert_ids() {
    let tok = bert();
    let ids = tok
        .encode_literal_with_max_len("what [SEP] is [CLS] this [DEC] [MASK]", 64)
        .unwrap();
    let cls = tok.cls_id();
    let sep = tok.token_to_id("[SEP]").unwrap();
    assert_eq!(ids.first(), Some(&cls));
    assert_eq!(ids.last(), Some(&sep));
    let inner = &ids[1..ids.len() - 1];
    for special in ["[SEP]", "[CLS]", "[DEC]", "[MASK]", "[PAD]"] {
        if let Some(id) = tok.token_to_id(special) {
            assert!(!inner.contains(&id), "{special} in {inner:?}");
        }
    }
    // Text without them tokenizes as the reference does.
    let q = qformer_text();
    assert_eq!(
        tok.encode_literal_with_max_len(&q, 256).unwrap(),
        tok.encode_question(&q).unwrap()
    );
}

#[test]
fn prompt_ids_split_at_the_image() {
    let tok = json_tokenizer();
    let reference = reference_i64("input_ids");
    let split = PromptIds::for_question(&tok, &prompt_str("question")).unwrap();
    let at = reference
        .iter()
        .position(|&id| id == IMAGE_TOKEN_INDEX)
        .expect("reference has the image placeholder");
    assert_eq!(split.before, to_u32(&reference[..at]));
    assert_eq!(split.after, to_u32(&reference[at + 1..]));
    assert_eq!(split.before.first(), Some(&tok.bos_id()));
    assert_eq!(split.sequence_len(6), reference.len() - 1 + 6);
}

#[test]
fn special_ids_agree_between_sources() {
    let dir = sentencepiece_only_dir();
    let spm = sentencepiece_tokenizer(&dir);
    let json = json_tokenizer();
    assert_eq!(spm.bos_id(), json.bos_id());
    assert_eq!(spm.eos_id(), json.eos_id());
    assert_eq!(spm.vocab_size(), json.vocab_size());
    assert_eq!(spm.vocab_size(), sentencepiece_model().pieces.len());
    let first = u32::try_from(reference_i64("input_ids")[0]).unwrap();
    assert_eq!(spm.bos_id(), first, "the reference prompt starts with BOS");
    assert_ne!(spm.eos_id(), spm.bos_id());
    for id in 0..spm.vocab_size() as u32 {
        assert_eq!(spm.id_to_token(id), json.id_to_token(id), "id {id}");
    }
}

#[test]
fn bare_model_file_without_json_configs_uses_the_trainer_spec() {
    let dir = TempDir::new("bare");
    let model = common::model_dir().join(LlamaTokenizer::MODEL_FILE);
    std::fs::copy(&model, dir.path().join(LlamaTokenizer::MODEL_FILE)).unwrap();
    let bare = LlamaTokenizer::from_model_dir(dir.path()).unwrap();
    let spm = sentencepiece_model();
    assert_eq!(bare.bos_id() as i32, spm.trainer.bos_id);
    assert_eq!(bare.eos_id() as i32, spm.trainer.eos_id);
    assert_eq!(bare.bos_id(), json_tokenizer().bos_id());
    assert_eq!(bare.eos_id(), json_tokenizer().eos_id());
}

#[test]
fn decoding_generated_ids_gives_the_reference_text() {
    let generated = to_u32(&reference_i64("generated_ids"));
    let expected = prompt_str("generated_text");
    let dir = sentencepiece_only_dir();
    for tok in [json_tokenizer(), sentencepiece_tokenizer(&dir)] {
        let decoded = tok.decode(&generated).unwrap();
        assert_eq!(
            decoded.trim(),
            expected.trim(),
            "{}",
            tok.source().display()
        );
        assert_eq!(
            clean_answer(&decoded),
            expected,
            "{}",
            tok.source().display()
        );
    }
}

#[test]
fn decode_skips_special_tokens_and_rejects_unknown_ids() {
    let tok = json_tokenizer();
    let ids = tok.encode_chunk("Describe the video", true).unwrap();
    let mut with_specials = ids.clone();
    with_specials.push(tok.eos_id());
    with_specials.insert(1, tok.bos_id());
    assert_eq!(tok.decode(&with_specials).unwrap(), "Describe the video");
    let err = tok.decode(&[tok.vocab_size() as u32 + 5]).unwrap_err();
    assert!(matches!(err, ModelError::Tokenizer { .. }), "{err}");
}

#[test]
fn clean_answer_strips_like_python_and_cuts_the_stop_string() {
    assert_eq!(clean_answer("  a cat. </s> \n"), "a cat.");
    assert_eq!(clean_answer("\u{1f}x\u{1c}"), "x");
    assert_eq!(clean_answer("x\u{17}"), "x\u{17}");
}

// ---------------------------------------------------------------------------------------------
// LLaMA tokenizer: tokenizer.model and tokenizer.json agree beyond the fixture prompt

#[test]
fn model_file_and_json_agree_on_many_strings() {
    let dir = sentencepiece_only_dir();
    let spm = sentencepiece_tokenizer(&dir);
    let json = json_tokenizer();
    let model = sentencepiece_model();
    let mut strings = hand_picked_strings();
    strings.extend(vocabulary_strings(&model));
    strings.extend(random_llama_strings(&model));
    strings.push("<s>special tokens in text</s> stay special".into());
    for s in &strings {
        for add_bos in [false, true] {
            assert_eq!(
                spm.encode_chunk(s, add_bos).unwrap(),
                json.encode_chunk(s, add_bos).unwrap(),
                "{s:?}"
            );
        }
        assert_eq!(
            tokenize_with_image(&spm, s).unwrap(),
            tokenize_with_image(&json, s).unwrap()
        );
    }
}

#[test]
fn merges_reproduce_sentencepiece_greedy_merging() {
    let dir = sentencepiece_only_dir();
    let spm = sentencepiece_tokenizer(&dir);
    let model = sentencepiece_model();
    let mut strings = hand_picked_strings();
    strings.extend(vocabulary_strings(&model));
    strings.extend(random_llama_strings(&model));
    for s in &strings {
        assert_eq!(
            spm.encode_chunk(s, false).unwrap(),
            sentencepiece_greedy_encode(&model, s),
            "{s:?}"
        );
    }
}

#[test]
fn digits_stay_single_tokens_when_trained_with_split_digits() {
    let model = sentencepiece_model();
    if !model.trainer.split_digits {
        eprintln!("model not trained with split_digits; skipped");
        return;
    }
    let tok = json_tokenizer();
    let digits = "0123456789 9876543210";
    let ids = tok.encode_chunk(digits, false).unwrap();
    let text: Vec<String> = ids.iter().map(|&id| tok.id_to_token(id).unwrap()).collect();
    for piece in &text {
        let n_digits = piece.chars().filter(char::is_ascii_digit).count();
        assert!(
            n_digits == 0 || piece.chars().count() == 1 || piece.starts_with("<0x"),
            "{piece:?} joins a digit to something else: {text:?}"
        );
    }
}

#[test]
fn decode_round_trips_text_with_byte_fallback() {
    let model = sentencepiece_model();
    if !model.trainer.byte_fallback {
        eprintln!("model has no byte fallback; skipped");
        return;
    }
    let dir = sentencepiece_only_dir();
    let spm = sentencepiece_tokenizer(&dir);
    let json = json_tokenizer();
    let mut strings = hand_picked_strings();
    strings.extend(random_llama_strings(&model));
    // A literal "▁" reads back as a space: SentencePiece cannot tell them apart.
    for s in strings.iter().filter(|s| !s.contains('\u{2581}')) {
        for tok in [&spm, &json] {
            let ids = tok.encode_chunk(s, true).unwrap();
            assert_eq!(&tok.decode(&ids).unwrap(), s, "{}", tok.source().display());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// prompt assembly edge cases (LLaVA's tokenizer_image_token)

#[test]
fn tokenize_with_image_edge_cases() {
    let tok = json_tokenizer();
    let bos = i64::from(tok.bos_id());
    let ids_of = |s: &str| -> Vec<i64> {
        tok.encode_chunk(s, false)
            .unwrap()
            .into_iter()
            .map(i64::from)
            .collect()
    };

    // No placeholder: the plain encoding, BOS first.
    let plain = tokenize_with_image(&tok, "USER: hello ASSISTANT:").unwrap();
    let mut expected = vec![bos];
    expected.extend(ids_of("USER: hello ASSISTANT:"));
    assert_eq!(plain, expected);

    // Two placeholders: three chunks, one BOS, two -200s.
    let two = tokenize_with_image(&tok, "a <image> b <image> c").unwrap();
    let mut expected = vec![bos];
    expected.extend(ids_of("a "));
    expected.push(IMAGE_TOKEN_INDEX);
    expected.extend(ids_of(" b "));
    expected.push(IMAGE_TOKEN_INDEX);
    expected.extend(ids_of(" c"));
    assert_eq!(two, expected);
    assert!(split_at_image(&two).is_err());

    // Placeholder first and alone: empty chunks encode to nothing.
    assert_eq!(
        tokenize_with_image(&tok, "<image>").unwrap(),
        vec![bos, IMAGE_TOKEN_INDEX]
    );
    let mut expected = vec![bos, IMAGE_TOKEN_INDEX];
    expected.extend(ids_of("\nhi"));
    assert_eq!(tokenize_with_image(&tok, "<image>\nhi").unwrap(), expected);
    assert_eq!(tokenize_with_image(&tok, "").unwrap(), vec![bos]);
}

#[test]
fn split_at_image_needs_exactly_one_placeholder() {
    let one = split_at_image(&[1, 5, IMAGE_TOKEN_INDEX, 6, 7]).unwrap();
    assert_eq!(one.before, vec![1, 5]);
    assert_eq!(one.after, vec![6, 7]);
    let edge = split_at_image(&[IMAGE_TOKEN_INDEX]).unwrap();
    assert!(edge.before.is_empty() && edge.after.is_empty());
    for ids in [
        vec![1, 5, 6],
        vec![1, IMAGE_TOKEN_INDEX, 2, IMAGE_TOKEN_INDEX],
        vec![],
    ] {
        let err = split_at_image(&ids).unwrap_err();
        assert!(matches!(err, ModelError::InvalidInput(_)), "{err}");
        assert!(err.to_string().contains("exactly one"), "{err}");
    }
    assert!(split_at_image(&[1, -3, IMAGE_TOKEN_INDEX]).is_err());
}

// ---------------------------------------------------------------------------------------------
// tokenizer files that are missing or broken

#[test]
fn missing_tokenizer_names_directory_and_both_files() {
    let dir = TempDir::new("missing");
    let err = LlamaTokenizer::from_model_dir(dir.path()).unwrap_err();
    assert!(matches!(err, ModelError::MissingFile { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    assert!(msg.contains("tokenizer.json"), "{msg}");
    assert!(msg.contains("tokenizer.model"), "{msg}");
}

#[test]
fn truncated_or_foreign_model_files_are_clear_errors() {
    let bytes = std::fs::read(common::model_dir().join(LlamaTokenizer::MODEL_FILE)).unwrap();
    let dir = TempDir::new("broken");
    let must_fail: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("last byte cut", bytes[..bytes.len() - 1].to_vec()),
        ("three bytes", bytes[..3].to_vec()),
        ("json", br#"{"model": {"type": "BPE"}}"#.to_vec()),
        ("garbage", (0..=255u8).rev().cycle().take(4096).collect()),
    ];
    for (what, content) in must_fail {
        let path = dir.write(LlamaTokenizer::MODEL_FILE, &content);
        let err = LlamaTokenizer::from_model_dir(dir.path())
            .expect_err(what)
            .to_string();
        assert!(err.contains(&path.display().to_string()), "{what}: {err}");
        eprintln!("{what}: {err}");
    }
    // Every other cut either fails with a message naming the file or, at a field boundary,
    // loads a consistent model; it never panics.
    for cut in (1..bytes.len()).step_by(97) {
        let path = dir.write(LlamaTokenizer::MODEL_FILE, &bytes[..cut]);
        if let Err(err) = LlamaTokenizer::from_model_dir(dir.path()) {
            assert!(
                err.to_string().contains(&path.display().to_string()),
                "{err}"
            );
        }
    }
}

#[test]
fn unigram_models_are_refused() {
    let mut bytes = std::fs::read(common::model_dir().join(LlamaTokenizer::MODEL_FILE)).unwrap();
    // A second trainer_spec (field 2) with model_type (field 3) = UNIGRAM (1); protobuf merges
    // repeated message fields, so this overrides the model type only.
    bytes.extend_from_slice(&[0x12, 0x02, 0x18, 0x01]);
    let parsed = SentencePieceModel::parse(&bytes).unwrap();
    assert_eq!(parsed.trainer.model_type, ModelType::Unigram);
    assert_eq!(parsed.pieces, sentencepiece_model().pieces);

    let dir = TempDir::new("unigram");
    dir.write(LlamaTokenizer::MODEL_FILE, &bytes);
    let err = LlamaTokenizer::from_model_dir(dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("Unigram") && err.contains("BPE"), "{err}");
}

#[test]
fn sentencepiece_model_file_is_read_completely() {
    let model = sentencepiece_model();
    assert_eq!(model.trainer.model_type, ModelType::Bpe);
    let unk = &model.pieces[model.trainer.unk_id as usize];
    assert_eq!(unk.kind, PieceType::Unknown);
    for id in [model.trainer.bos_id, model.trainer.eos_id] {
        assert_eq!(model.pieces[id as usize].kind, PieceType::Control);
    }
    if model.trainer.byte_fallback {
        let bytes = model
            .pieces
            .iter()
            .filter(|p| p.kind == PieceType::Byte)
            .count();
        assert_eq!(bytes, 256);
    }
    // Same vocabulary, in the same order, as the fixture's tokenizer.json.
    let json = json_tokenizer();
    for (id, p) in model.pieces.iter().enumerate() {
        assert_eq!(json.token_to_id(&p.piece), Some(id as u32), "{:?}", p.piece);
    }
}

// ---------------------------------------------------------------------------------------------
// BERT WordPiece for the Q-Former

fn bert_dir() -> PathBuf {
    common::fixture_dir().join("bert-base-uncased")
}

fn bert() -> BertTokenizer {
    BertTokenizer::from_vocab_file(&bert_dir().join("vocab.txt")).expect("vocab.txt loads")
}

#[test]
fn bert_reproduces_qformer_ids() {
    let ids = bert().encode_question(&qformer_text()).unwrap();
    let expected = to_u32(&reference_i64("qformer_input_ids"));
    assert_eq!(ids, expected);
    assert_eq!(ids, to_u32(&prompt_i64("qformer_input_ids")));
}

#[test]
fn bert_agrees_with_the_fixture_tokenizer_json() {
    let ours = bert();
    let reference = tokenizers::Tokenizer::from_file(bert_dir().join("tokenizer.json"))
        .expect("bert tokenizer.json loads");
    let long_word = "a".repeat(101);
    let mut strings: Vec<String> = [
        "Describe what happened in this video.",
        "What is the person doing?!",
        "punctuation: (a), [b]; {c} -- \"d\" 'e' ... well,then",
        "ÀCCÉNTS Crème Brûlée NAÏVE façade",
        "CJK 中文字幕 and かな mixed视频",
        "UPPER lower MiXeD",
        "tabs\tand\nnewlines  and   spaces",
        "control\u{0}chars\u{7} and \u{fffd} replacement",
        "digits 12345 and 3.14",
        "[CLS] in text [SEP] stays special [MASK]",
        "unknown symbols: ~ € @ # 😀",
        "",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    strings.push(format!("short {long_word} words"));
    strings.push("a".repeat(100));
    let alphabet: Vec<char> = "abcdefghijklmnopqrstuvwxyz ABCDE.,?!'\"()-é中 0123456789#"
        .chars()
        .collect();
    strings.extend(random_strings(&alphabet, 300, 0xbe27));
    for s in &strings {
        let expected = reference.encode(s.as_str(), true).unwrap();
        assert_eq!(
            ours.encode_question(s).unwrap(),
            expected.get_ids(),
            "{s:?}"
        );
    }
    let unk = ours.token_to_id("[UNK]").unwrap();
    let ids = ours
        .encode_question(&format!("short {long_word} words"))
        .unwrap();
    assert!(
        ids.contains(&unk),
        "a word over 100 characters is [UNK]: {ids:?}"
    );
}

#[test]
fn bert_truncates_from_the_left() {
    let tok = bert();
    let words: Vec<String> = (0..400).map(|i| format!("w{i}")).collect();
    let question = words.join(" ");
    let full = tok
        .encode_with_max_len(&question, usize::MAX)
        .expect("untruncated");
    assert!(full.len() > QFORMER_MAX_TOKENS);
    let ids = tok.encode_question(&question).unwrap();
    assert_eq!(ids.len(), QFORMER_MAX_TOKENS);
    assert_eq!(ids[0], tok.cls_id());
    assert_eq!(ids[ids.len() - 1], tok.sep_id());
    let content = &full[1..full.len() - 1];
    assert_eq!(
        &ids[1..ids.len() - 1],
        &content[content.len() - (QFORMER_MAX_TOKENS - 2)..]
    );
    // Short input is untouched; a too-small limit is refused, not a panic.
    let short = tok.encode_with_max_len("what", 3).unwrap();
    assert_eq!(short.len(), 3);
    assert_eq!(
        tok.encode_with_max_len("what is", 2).unwrap(),
        vec![tok.cls_id(), tok.sep_id()]
    );
    assert!(tok.encode_with_max_len("what", 1).is_err());
}

#[test]
fn bert_dec_token_follows_the_vocabulary() {
    let tok = bert();
    let lines = std::fs::read_to_string(bert_dir().join("vocab.txt"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(tok.token_to_id(DEC_TOKEN), Some(lines as u32));
    assert_eq!(tok.vocab_size(), lines + 1);
    assert_eq!(
        tok.encode_question(DEC_TOKEN).unwrap(),
        vec![tok.cls_id(), lines as u32, tok.sep_id()]
    );
}

#[test]
fn bert_missing_or_incomplete_vocab_is_a_clear_error() {
    let dir = TempDir::new("bert");
    let missing = dir.path().join("vocab.txt");
    let err = BertTokenizer::from_vocab_file(&missing).unwrap_err();
    assert!(matches!(err, ModelError::MissingFile { .. }), "{err}");
    assert!(err.to_string().contains(&missing.display().to_string()));

    let path = dir.write("vocab.txt", b"[PAD]\n[UNK]\nhello\n");
    let err = BertTokenizer::from_vocab_file(&path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("[CLS]") && err.contains(&path.display().to_string()),
        "{err}"
    );
}
