//! The tensors of a LLaMA-VID deployment of a given shape (a JSON like
//! `shared/bench/cpu-bench.json`), and their random initialisation.

use anyhow::{bail, Context, Result};
use serde_json::Value;

use gstllamavid::model::torch_save::{StorageType, TensorEntry};

/// Sizes of every part, read from the shape JSON.
#[derive(Debug, Clone)]
pub struct ModelShape {
    pub image_size: usize,
    pub patch_size: usize,
    pub vision_width: usize,
    pub vision_depth_used: usize,
    pub vision_depth_in_file: usize,
    pub vision_heads: usize,
    pub vision_mlp: usize,
    pub bert_hidden: usize,
    pub bert_layers: usize,
    pub bert_heads: usize,
    pub bert_intermediate: usize,
    pub bert_vocab: usize,
    pub bert_max_position: usize,
    pub cross_attention_freq: usize,
    pub num_query: usize,
    pub llm_hidden: usize,
    pub llm_intermediate: usize,
    pub llm_layers: usize,
    pub llm_heads: usize,
    pub llm_kv_heads: usize,
    pub llm_vocab: usize,
    pub llm_max_position: usize,
    pub rms_eps: f64,
    pub rope_theta: f64,
    pub compress_type: String,
    pub projector_type: String,
    pub seed: u64,
    pub std: f32,
    /// `param_counts` of the JSON, when it has them.
    pub expected_counts: Option<ParamCounts>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamCounts {
    pub vision: u64,
    pub qformer: u64,
    pub projectors: u64,
    pub llm: u64,
}

impl ParamCounts {
    pub fn total(&self) -> u64 {
        self.vision + self.qformer + self.projectors + self.llm
    }
}

fn get<'a>(v: &'a Value, path: &str) -> Result<&'a Value> {
    let mut cur = v;
    for key in path.split('.') {
        cur = cur
            .get(key)
            .with_context(|| format!("shape JSON has no {path}"))?;
    }
    Ok(cur)
}

fn usize_at(v: &Value, path: &str) -> Result<usize> {
    get(v, path)?
        .as_u64()
        .map(|x| x as usize)
        .with_context(|| format!("{path} is not a non-negative integer"))
}

fn f64_at(v: &Value, path: &str) -> Result<f64> {
    get(v, path)?
        .as_f64()
        .with_context(|| format!("{path} is not a number"))
}

impl ModelShape {
    pub fn from_json(v: &Value) -> Result<Self> {
        let std = match get(v, "init.matrices_embeddings_conv_queries_pos_cls")
            .ok()
            .and_then(Value::as_str)
        {
            Some(text) => parse_std(text).unwrap_or(0.02),
            None => 0.02,
        };
        let expected_counts = get(v, "param_counts").ok().map(|pc| ParamCounts {
            vision: pc["vision"].as_u64().unwrap_or(0),
            qformer: pc["qformer"].as_u64().unwrap_or(0),
            projectors: pc["projectors"].as_u64().unwrap_or(0),
            llm: pc["llm"].as_u64().unwrap_or(0),
        });
        let shape = Self {
            image_size: usize_at(v, "vision.image_size")?,
            patch_size: usize_at(v, "vision.patch_size")?,
            vision_width: usize_at(v, "vision.width")?,
            vision_depth_used: usize_at(v, "vision.depth_used")?,
            vision_depth_in_file: usize_at(v, "vision.depth_in_release_file")?,
            vision_heads: usize_at(v, "vision.heads")?,
            vision_mlp: usize_at(v, "vision.mlp_hidden")?,
            bert_hidden: usize_at(v, "qformer.hidden")?,
            bert_layers: usize_at(v, "qformer.layers")?,
            bert_heads: usize_at(v, "qformer.heads")?,
            bert_intermediate: usize_at(v, "qformer.intermediate")?,
            // The JSON gives the rows of the embedding (vocab.txt plus [DEC]).
            bert_vocab: usize_at(v, "qformer.vocab")?
                .checked_sub(1)
                .context("qformer.vocab must count [DEC]")?,
            bert_max_position: usize_at(v, "qformer.max_position")?,
            cross_attention_freq: usize_at(v, "qformer.cross_attention_freq")?,
            num_query: usize_at(v, "qformer.num_query")?,
            llm_hidden: usize_at(v, "llm.hidden")?,
            llm_intermediate: usize_at(v, "llm.intermediate")?,
            llm_layers: usize_at(v, "llm.layers")?,
            llm_heads: usize_at(v, "llm.heads")?,
            llm_kv_heads: usize_at(v, "llm.kv_heads")?,
            llm_vocab: usize_at(v, "llm.vocab")?,
            llm_max_position: usize_at(v, "llm.max_position")?,
            rms_eps: f64_at(v, "llm.rms_eps")?,
            rope_theta: f64_at(v, "llm.rope_theta")?,
            compress_type: get(v, "projectors.compress_type")
                .ok()
                .and_then(Value::as_str)
                .unwrap_or("mean")
                .to_owned(),
            projector_type: get(v, "projectors.mm_projector.type")
                .ok()
                .and_then(Value::as_str)
                .unwrap_or("mlp2x_gelu")
                .to_owned(),
            seed: get(v, "init.seed")
                .ok()
                .and_then(Value::as_u64)
                .unwrap_or(1234),
            std,
            expected_counts,
        };
        shape.check()?;
        Ok(shape)
    }

    fn check(&self) -> Result<()> {
        if !self.image_size.is_multiple_of(self.patch_size) {
            bail!("image_size must be a multiple of patch_size");
        }
        if !self.vision_width.is_multiple_of(self.vision_heads)
            || !self.bert_hidden.is_multiple_of(self.bert_heads)
            || !self.llm_hidden.is_multiple_of(self.llm_heads)
            || !self.llm_heads.is_multiple_of(self.llm_kv_heads)
        {
            bail!("a width is not a multiple of its head count");
        }
        if self.vision_depth_in_file < self.vision_depth_used {
            bail!("the EVA file must hold at least depth_used blocks");
        }
        let tokens = self.grid() * self.grid() + 1;
        if tokens.is_multiple_of(2) {
            bail!("patches + CLS must be odd (the reference then keeps CLS in the patches)");
        }
        Ok(())
    }

    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
}

fn parse_std(text: &str) -> Option<f32> {
    let i = text.find("std")?;
    text[i + 3..]
        .trim_start()
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()?
        .parse()
        .ok()
}

/// How a tensor is filled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Normal,
    Zeros,
    Ones,
    /// 0, 1, 2, … as int64 (`position_ids`).
    Arange,
    /// RoPE `inv_freq` of the given head dim and base.
    InvFreq {
        head_dim: usize,
        theta: f64,
    },
}

/// Which part of the model a parameter counts towards (buffers count nowhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Vision,
    QFormer,
    Projectors,
    Llm,
    /// In the file but not a parameter of the model as built (buffers, the extra EVA block).
    Uncounted,
}

#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    pub part: Part,
    /// Integer buffers keep their own type whatever the float dtype on disk.
    pub int64: bool,
}

impl TensorSpec {
    fn new(name: impl Into<String>, shape: &[usize], init: Init, part: Part) -> Self {
        Self {
            name: name.into(),
            shape: shape.to_vec(),
            init,
            part,
            int64: false,
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn entry(&self, float: StorageType) -> TensorEntry {
        TensorEntry {
            name: self.name.clone(),
            dtype: if self.int64 { StorageType::I64 } else { float },
            shape: self.shape.clone(),
        }
    }
}

struct Specs(Vec<TensorSpec>);

impl Specs {
    fn add(&mut self, name: impl Into<String>, shape: &[usize], init: Init, part: Part) {
        self.0.push(TensorSpec::new(name, shape, init, part));
    }

    fn linear(&mut self, prefix: &str, out: usize, inp: usize, bias: bool, part: Part) {
        self.add(format!("{prefix}.weight"), &[out, inp], Init::Normal, part);
        if bias {
            self.add(format!("{prefix}.bias"), &[out], Init::Zeros, part);
        }
    }

    fn norm(&mut self, prefix: &str, dim: usize, bias: bool, part: Part) {
        self.add(format!("{prefix}.weight"), &[dim], Init::Ones, part);
        if bias {
            self.add(format!("{prefix}.bias"), &[dim], Init::Zeros, part);
        }
    }
}

/// The flat EVA state dict (`eva_vit_g.pth`), LAVIS names, with the extra trailing block(s).
pub fn eva_tensors(s: &ModelShape) -> Vec<TensorSpec> {
    let w = s.vision_width;
    let p = s.patch_size;
    let positions = s.grid() * s.grid() + 1;
    let mut t = Specs(Vec::new());
    t.add("cls_token", &[1, 1, w], Init::Normal, Part::Vision);
    t.add("pos_embed", &[1, positions, w], Init::Normal, Part::Vision);
    t.add(
        "patch_embed.proj.weight",
        &[w, 3, p, p],
        Init::Normal,
        Part::Vision,
    );
    t.add("patch_embed.proj.bias", &[w], Init::Zeros, Part::Vision);
    for i in 0..s.vision_depth_in_file {
        let part = if i < s.vision_depth_used {
            Part::Vision
        } else {
            Part::Uncounted
        };
        let b = format!("blocks.{i}");
        t.norm(&format!("{b}.norm1"), w, true, part);
        t.add(format!("{b}.attn.q_bias"), &[w], Init::Zeros, part);
        t.add(format!("{b}.attn.v_bias"), &[w], Init::Zeros, part);
        t.add(
            format!("{b}.attn.qkv.weight"),
            &[3 * w, w],
            Init::Normal,
            part,
        );
        t.linear(&format!("{b}.attn.proj"), w, w, true, part);
        t.norm(&format!("{b}.norm2"), w, true, part);
        t.linear(&format!("{b}.mlp.fc1"), s.vision_mlp, w, true, part);
        t.linear(&format!("{b}.mlp.fc2"), w, s.vision_mlp, true, part);
    }
    t.0
}

/// The HF checkpoint's tensors (LLM, projectors, Q-Former), in the order the reference
/// model registers them (which is the order `save_pretrained` shards them in).
pub fn hf_tensors(s: &ModelShape) -> Vec<TensorSpec> {
    let (h, i) = (s.llm_hidden, s.llm_intermediate);
    let head_dim = h / s.llm_heads;
    let kv = s.llm_kv_heads * head_dim;
    let mut t = Specs(Vec::new());
    t.add(
        "model.embed_tokens.weight",
        &[s.llm_vocab, h],
        Init::Normal,
        Part::Llm,
    );
    for l in 0..s.llm_layers {
        let b = format!("model.layers.{l}");
        t.linear(&format!("{b}.self_attn.q_proj"), h, h, false, Part::Llm);
        t.linear(&format!("{b}.self_attn.k_proj"), kv, h, false, Part::Llm);
        t.linear(&format!("{b}.self_attn.v_proj"), kv, h, false, Part::Llm);
        t.linear(&format!("{b}.self_attn.o_proj"), h, h, false, Part::Llm);
        t.add(
            format!("{b}.self_attn.rotary_emb.inv_freq"),
            &[head_dim / 2],
            Init::InvFreq {
                head_dim,
                theta: s.rope_theta,
            },
            Part::Uncounted,
        );
        t.linear(&format!("{b}.mlp.gate_proj"), i, h, false, Part::Llm);
        t.linear(&format!("{b}.mlp.up_proj"), i, h, false, Part::Llm);
        t.linear(&format!("{b}.mlp.down_proj"), h, i, false, Part::Llm);
        t.norm(&format!("{b}.input_layernorm"), h, false, Part::Llm);
        t.norm(
            &format!("{b}.post_attention_layernorm"),
            h,
            false,
            Part::Llm,
        );
    }
    t.norm("model.norm", h, false, Part::Llm);

    // mm_projector, then the attention modules LLaMA-VID adds.
    let (w, q) = (s.vision_width, s.bert_hidden);
    if s.projector_type == "linear" {
        t.linear("model.mm_projector", h, w, true, Part::Projectors);
    } else {
        t.linear("model.mm_projector.0", h, w, true, Part::Projectors);
        t.linear("model.mm_projector.2", h, h, true, Part::Projectors);
    }
    let bert = "model.vlm_att_encoder.bert";
    t.add(
        format!("{bert}.embeddings.word_embeddings.weight"),
        &[s.bert_vocab + 1, q],
        Init::Normal,
        Part::QFormer,
    );
    t.add(
        format!("{bert}.embeddings.position_embeddings.weight"),
        &[s.bert_max_position, q],
        Init::Normal,
        Part::QFormer,
    );
    t.norm(
        &format!("{bert}.embeddings.LayerNorm"),
        q,
        true,
        Part::QFormer,
    );
    let mut ids = TensorSpec::new(
        format!("{bert}.embeddings.position_ids"),
        &[1, s.bert_max_position],
        Init::Arange,
        Part::Uncounted,
    );
    ids.int64 = true;
    t.0.push(ids);
    for l in 0..s.bert_layers {
        let b = format!("{bert}.encoder.layer.{l}");
        let part = Part::QFormer;
        for m in ["query", "key", "value"] {
            t.linear(&format!("{b}.attention.self.{m}"), q, q, true, part);
        }
        t.linear(&format!("{b}.attention.output.dense"), q, q, true, part);
        t.norm(&format!("{b}.attention.output.LayerNorm"), q, true, part);
        if l % s.cross_attention_freq == 0 {
            t.linear(&format!("{b}.crossattention.self.query"), q, q, true, part);
            t.linear(&format!("{b}.crossattention.self.key"), q, w, true, part);
            t.linear(&format!("{b}.crossattention.self.value"), q, w, true, part);
            t.linear(
                &format!("{b}.crossattention.output.dense"),
                q,
                q,
                true,
                part,
            );
            t.norm(
                &format!("{b}.crossattention.output.LayerNorm"),
                q,
                true,
                part,
            );
        }
        t.linear(
            &format!("{b}.intermediate.dense"),
            s.bert_intermediate,
            q,
            true,
            part,
        );
        t.linear(
            &format!("{b}.output.dense"),
            q,
            s.bert_intermediate,
            true,
            part,
        );
        t.norm(&format!("{b}.output.LayerNorm"), q, true, part);
        t.linear(
            &format!("{b}.intermediate_query.dense"),
            s.bert_intermediate,
            q,
            true,
            part,
        );
        t.linear(
            &format!("{b}.output_query.dense"),
            q,
            s.bert_intermediate,
            true,
            part,
        );
        t.norm(&format!("{b}.output_query.LayerNorm"), q, true, part);
    }
    t.add(
        "model.vlm_att_query",
        &[1, s.num_query, q],
        Init::Normal,
        Part::QFormer,
    );
    t.norm("model.vlm_att_ln", w, true, Part::QFormer);
    t.linear("model.vlm_att_projector", w, q, true, Part::Projectors);
    t.linear("model.vlm_att_key_projector", w, w, true, Part::Projectors);
    t.linear("model.vlm_att_val_projector", h, w, true, Part::Projectors);
    t.add("lm_head.weight", &[s.llm_vocab, h], Init::Normal, Part::Llm);
    t.0
}

/// Parameters per part of a list of tensors.
pub fn count(specs: &[TensorSpec]) -> ParamCounts {
    let mut c = ParamCounts::default();
    for s in specs {
        let n = s.numel() as u64;
        match s.part {
            Part::Vision => c.vision += n,
            Part::QFormer => c.qformer += n,
            Part::Projectors => c.projectors += n,
            Part::Llm => c.llm += n,
            Part::Uncounted => {}
        }
    }
    c
}

/// A small, fast, seedable generator (SplitMix64 seeding a xoshiro256++ stream) and
/// Box-Muller normals: reproducible across platforms and cheap for billions of values.
pub struct Rng {
    s: [u64; 4],
    spare: Option<f32>,
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E3779B97F4A7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^ (z >> 31)
}

impl Rng {
    /// A stream for one tensor: the seed mixed with the tensor's name, so every tensor's values
    /// are the same whatever the file layout.
    pub fn for_tensor(seed: u64, name: &str) -> Self {
        let mut state = seed;
        for b in name.bytes() {
            state = splitmix(&mut state) ^ b as u64;
        }
        let s = [
            splitmix(&mut state),
            splitmix(&mut state),
            splitmix(&mut state),
            splitmix(&mut state),
        ];
        Self { s, spare: None }
    }

    #[inline]
    fn next_u64(&mut self) -> u64 {
        let result = (self.s[0].wrapping_add(self.s[3]))
            .rotate_left(23)
            .wrapping_add(self.s[0]);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// A standard normal value.
    #[inline]
    pub fn normal(&mut self) -> f32 {
        if let Some(v) = self.spare.take() {
            return v;
        }
        let bits = self.next_u64();
        // Two 32-bit uniforms in (0, 1].
        let u1 = ((bits >> 40) as f64 + 1.0) / (1u64 << 24) as f64;
        let u2 = ((bits & 0xFF_FFFF) as f64) / (1u64 << 24) as f64;
        let r = (-2.0 * u1.ln()).sqrt();
        let (sin, cos) = (std::f64::consts::TAU * u2).sin_cos();
        self.spare = Some((r * sin) as f32);
        (r * cos) as f32
    }
}

/// Fills `out` with the next values of tensor `spec` (f32), `offset` elements into it.
pub fn fill_f32(spec: &TensorSpec, std: f32, rng: &mut Rng, offset: usize, out: &mut [f32]) {
    match spec.init {
        Init::Normal => out.iter_mut().for_each(|v| *v = rng.normal() * std),
        Init::Zeros => out.fill(0.0),
        Init::Ones => out.fill(1.0),
        Init::Arange => out
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = (offset + i) as f32),
        Init::InvFreq { head_dim, theta } => out.iter_mut().enumerate().for_each(|(i, v)| {
            let k = offset + i;
            *v = 1.0 / (theta as f32).powf(2.0 * k as f32 / head_dim as f32)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bench_shape() -> ModelShape {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../shared/bench/cpu-bench.json"),
        );
        let Ok(text) = text else {
            // Fall back to the documented dimensions when the shared folder is absent.
            return ModelShape::from_json(&serde_json::json!({
                "vision": {"image_size": 224, "patch_size": 14, "width": 1408, "depth_used": 39,
                           "depth_in_release_file": 40, "heads": 16, "mlp_hidden": 6144},
                "qformer": {"hidden": 768, "layers": 12, "heads": 12, "intermediate": 3072,
                            "vocab": 30523, "max_position": 512, "cross_attention_freq": 2,
                            "num_query": 32},
                "llm": {"hidden": 2048, "intermediate": 5632, "layers": 22, "heads": 16,
                        "kv_heads": 16, "vocab": 32000, "max_position": 4096, "rms_eps": 1e-5,
                        "rope_theta": 10000.0},
                "param_counts": {"vision": 985894528u64, "qformer": 185687552u64,
                                 "projectors": 13034240u64, "llm": 1261529088u64}
            }))
            .unwrap();
        };
        ModelShape::from_json(&serde_json::from_str(&text).unwrap()).unwrap()
    }

    #[test]
    fn bench_shape_has_the_documented_parameter_counts() {
        let s = bench_shape();
        let mut specs = eva_tensors(&s);
        specs.extend(hf_tensors(&s));
        let counts = count(&specs);
        assert_eq!(Some(counts), s.expected_counts);
        assert_eq!(counts.total(), 2_446_145_408);
    }

    #[test]
    fn normals_have_unit_variance() {
        let mut rng = Rng::for_tensor(1234, "x");
        let n = 200_000;
        let v: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
        let mean = v.iter().sum::<f32>() / n as f32;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n as f32;
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((var - 1.0).abs() < 0.02, "{var}");
    }
}
