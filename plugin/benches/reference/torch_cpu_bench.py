#!/usr/bin/env python3
"""The PyTorch reference side of the CPU benchmark (issue 16): LLaMA-VID in PyTorch f32 on the CPU.

`plugin/benches/cpu_bench.rs` measures our implementation on the workload of
`shared/bench/cpu-bench.json`; this script measures the same figures for the reference stack
(torch 2.0.1 with MKL, transformers 4.31.0, the versions LLaMA-VID pins) so that both can be run
back to back on one machine. Run it through `plugin/scripts/torch-ref-env.sh`, which provides
those versions in a cached venv:

    flock /tmp/llamavid-bench.lock plugin/scripts/torch-ref-env.sh \\
        [--only encode1,encode8,caption] [--repeats 5] [--threads 2] [--json out.json]

The model is built at the json's shapes with random weights (the json's `init`; values do not
affect the cost), with the operations the reference code runs:

* EVA-ViT-G (39 blocks) in plain torch the way LAVIS's eva_vit.py writes it: Conv2d patch embed,
  CLS token, absolute position embedding, pre-LN blocks whose attention is one bias-free qkv
  Linear with the bias `[q_bias ; 0 ; v_bias]` concatenated per call, scaled q @ kᵀ, softmax,
  @ v, proj; MLP fc1, nn.GELU (erf), fc2; no final norm.
* The Q-Former is transformers' `InstructBlipQFormerModel` (BERT-base with cross-attention to
  the 1408-wide vision features every 2nd layer and separate query/text FFNs, the layout of the
  LAVIS Q-Former LLaMA-VID copies), fed `vlm_att_ln(vision features)`, the 32 learned queries
  and the question's BERT ids.
* Context/content tokens as LLaMA-VID's `token_generation` (shared/llamavid-spec.md §6):
  single-head attention of the projected queries over the key-projected patches (scale
  1/sqrt(1408)), mean over the queries, `vlm_att_val_projector`; the patch mean through the
  `mlp2x_gelu` mm_projector.
* The LLM is transformers' `LlamaForCausalLM` (1.26B), prefill on `inputs_embeds` (the text
  embeddings spliced around the video tokens, as `prepare_inputs_labels_for_multimodal` does),
  then greedy decoding with the KV cache (`past_key_values`, `input_ids` of the last token).

Figures, as cpu_bench times them (one warm-up, then the median of `--repeats`), all under
`torch.inference_mode()` on `torch.set_num_threads(--threads)`:

    encode1   encode 1 frame: normalized (1,3,224,224) f32 pixels -> 2 tokens (EVA, Q-Former,
              context/content tokens); CLIP preprocessing excluded
    encode8   the same for a batch of 8 frames, per frame, and split by stage
    caption   prefill of the spliced sequence (115 positions), decode per token (31 single-token
              steps, EOS ignored), 32-token total
    batch     one decode step of 1 and of 4 sequences advanced together
    baseline  prefill of a 4-frame window with 256 visual tokens per frame (1075 positions)
              against LLaMA-VID's 2 per frame (59)

plus the model build time (constructing and randomly initialising it; cpu_bench's "model load"
reads files instead, so the two are not comparable) and the peak resident memory.

ATen's kernels follow `ATEN_CPU_CAPABILITY` (avx2, avx512, default) and MKL's GEMMs follow
`MKL_ENABLE_INSTRUCTIONS` (AVX2, AVX512, ...); both are printed with the capability torch
reports and a 2048³ f32 product's time, so a run narrowed to AVX2 shows that it was.
"""

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[3]
DEFAULT_SHAPE = REPO.parent / "shared" / "bench" / "cpu-bench.json"
FIGURES = ("encode", "encode1", "encode8", "caption", "batch", "baseline")
GEMM_FLOP = 2.0 * 2048**3


def parse_args():
    parser = argparse.ArgumentParser(
        description="PyTorch f32 reference of the LLaMA-VID CPU benchmark (cpu-bench.json)."
    )
    parser.add_argument("--shape", type=Path, default=DEFAULT_SHAPE, help="the workload json")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: the json's threads)"
    )
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated figures: " + ",".join(FIGURES) + " (default: all)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.only is not None:
        args.only = [f for f in args.only.split(",") if f]
        unknown = sorted(set(args.only) - set(FIGURES))
        if unknown:
            parser.error(
                f"--only: unknown figure(s) {', '.join(unknown)}; known: {', '.join(FIGURES)}"
            )
    return args


# ----------------------------------------------------------------------------------------------
# EVA-ViT-G, written as LAVIS's eva_vit.py writes it (inference path: no dropout, no drop path,
# no relative position bias, no layer scale).


class EvaPatchEmbed(nn.Module):
    def __init__(self, patch, width):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class EvaAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.scale = (width // heads) ** -0.5
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        batch, tokens, _ = x.shape
        # The key has no bias: LAVIS builds [q_bias ; 0 ; v_bias] on every call.
        qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, qkv_bias)
        qkv = qkv.reshape(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * self.scale
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(batch, tokens, -1)
        return self.proj(x)


class EvaMlp(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EvaBlock(nn.Module):
    def __init__(self, width, heads, mlp_hidden, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = EvaAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = EvaMlp(width, mlp_hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EvaVisionTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        width = cfg["width"]
        self.patch_embed = EvaPatchEmbed(cfg["patch_size"], width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg["tokens_with_cls"], width))
        self.blocks = nn.ModuleList(
            EvaBlock(width, cfg["heads"], cfg["mlp_hidden"], cfg["ln_eps"])
            for _ in range(cfg["depth_used"])
        )

    def forward(self, pixels):
        x = self.patch_embed(pixels)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x  # no final norm: the 39-block output is what LLaMA-VID uses


# ----------------------------------------------------------------------------------------------
# LLaMA-VID: vision tower, text-guided Q-Former, context/content tokens, LLaMA.


class LlamaVidReference(nn.Module):
    def __init__(self, shape):
        super().__init__()
        from transformers import (
            InstructBlipQFormerConfig,
            InstructBlipQFormerModel,
            LlamaConfig,
            LlamaForCausalLM,
        )

        vis, qf, llm, proj = shape["vision"], shape["qformer"], shape["llm"], shape["projectors"]
        self.vision = EvaVisionTransformer(vis)
        self.vlm_att_ln = nn.LayerNorm(qf["vision_ln"]["dim"], eps=qf["vision_ln"]["eps"])
        self.qformer = InstructBlipQFormerModel(
            InstructBlipQFormerConfig(
                vocab_size=qf["vocab"],
                hidden_size=qf["hidden"],
                num_hidden_layers=qf["layers"],
                num_attention_heads=qf["heads"],
                intermediate_size=qf["intermediate"],
                hidden_act="gelu",  # transformers' "gelu" is the erf form
                max_position_embeddings=qf["max_position"],
                layer_norm_eps=qf["ln_eps"],
                cross_attention_frequency=qf["cross_attention_freq"],
                encoder_hidden_size=qf["encoder_width"],
            )
        )
        self.vlm_att_query = nn.Parameter(torch.zeros(proj["vlm_att_query"]))
        self.vlm_att_projector = linear(proj["vlm_att_projector"])
        self.vlm_att_key_projector = linear(proj["vlm_att_key_projector"])
        self.vlm_att_val_projector = linear(proj["vlm_att_val_projector"])
        if proj["mm_projector"]["type"] != "mlp2x_gelu":
            raise ValueError(f"mm_projector type {proj['mm_projector']['type']} is not mlp2x_gelu")
        (out1, in1), (out2, in2) = proj["mm_projector"]["shapes"]
        bias = proj["mm_projector"].get("bias", True)
        self.mm_projector = nn.Sequential(
            nn.Linear(in1, out1, bias=bias), nn.GELU(), nn.Linear(in2, out2, bias=bias)
        )
        if proj.get("compress_type", "mean") != "mean":
            raise ValueError(f"compress_type {proj['compress_type']} is not mean")
        if llm.get("rope_theta", 10000.0) != 10000.0:
            # transformers 4.31's LLaMA has a fixed RoPE base of 10000.
            raise ValueError(f"rope_theta {llm['rope_theta']} is not 10000")
        self.llm = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=llm["vocab"],
                hidden_size=llm["hidden"],
                intermediate_size=llm["intermediate"],
                num_hidden_layers=llm["layers"],
                num_attention_heads=llm["heads"],
                num_key_value_heads=llm["kv_heads"],
                hidden_act=llm["act"],
                max_position_embeddings=llm["max_position"],
                rms_norm_eps=llm["rms_eps"],
                tie_word_embeddings=llm["tie_word_embeddings"],
            )
        )

    def qformer_queries(self, features, qformer_ids):
        """LLaMA-VID's `vlm_attention` up to the Q-Former's query rows: (T,32,768)."""
        frames = features.shape[0]
        vision_in = self.vlm_att_ln(features)
        queries = self.vlm_att_query.expand(frames, -1, -1)
        ids = qformer_ids.expand(frames, -1)
        query_mask = torch.ones(frames, queries.shape[1] + ids.shape[1], dtype=torch.long)
        vision_mask = torch.ones(vision_in.shape[:-1], dtype=torch.long)
        out = self.qformer(
            input_ids=ids,
            attention_mask=query_mask,
            query_embeds=queries,
            encoder_hidden_states=vision_in,
            encoder_attention_mask=vision_mask,
            return_dict=True,
        )
        return out.last_hidden_state[:, : queries.shape[1]]

    def frame_tokens(self, features, queries):
        """LLaMA-VID's `token_generation` (video, compress_type mean): (T,2,hidden)."""
        text_q = self.vlm_att_projector(queries)
        patches = features[:, 1:]  # CLS dropped, no norm
        keys = self.vlm_att_key_projector(patches)
        scores = text_q @ keys.transpose(-1, -2) / patches.shape[-1] ** 0.5
        context = (scores.softmax(-1) @ patches).mean(1)
        context = self.vlm_att_val_projector(context[:, None])
        content = self.mm_projector(patches.mean(dim=1, keepdim=True))
        return torch.cat([context, content], dim=1)

    def encode(self, pixels, qformer_ids):
        features = self.vision(pixels)
        return self.frame_tokens(features, self.qformer_queries(features, qformer_ids))

    def input_embeddings(self, llm_ids, video_tokens):
        """The text embeddings spliced around the video tokens at the image marker (-200)."""
        marker = llm_ids.index(-200)
        embed = self.llm.get_input_embeddings()
        before = embed(torch.tensor(llm_ids[:marker]))
        after = embed(torch.tensor(llm_ids[marker + 1 :]))
        return torch.cat([before, video_tokens, after])[None]


def linear(spec):
    """A projector from cpu-bench.json: {"shape": [out, in], "bias": bool}."""
    out_features, in_features = spec["shape"]
    return nn.Linear(in_features, out_features, bias=spec.get("bias", True))


@contextlib.contextmanager
def default_init_skipped():
    """Builds modules with uninitialised storage: torch's and transformers' default inits
    would fill every weight once more before `random_init` does (tens of seconds here)."""
    from transformers.modeling_utils import no_init_weights

    classes = (nn.Linear, nn.Embedding, nn.Conv2d, nn.LayerNorm)
    saved = [(cls, cls.reset_parameters) for cls in classes]
    try:
        for cls in classes:
            cls.reset_parameters = lambda self: None
        with no_init_weights():
            yield
    finally:
        for cls, reset in saved:
            cls.reset_parameters = reset


def random_init(model, std):
    """cpu-bench.json's init: norms weight 1 / bias 0, every bias (EVA's q_bias/v_bias
    included) 0, everything else (matrices, embeddings, conv, queries, pos/cls) normal(0, std)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norms = (nn.LayerNorm, LlamaRMSNorm)
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                if isinstance(module, norms):
                    param.fill_(1.0 if name == "weight" else 0.0)
                elif name == "bias" or name.endswith("_bias"):
                    param.zero_()
                else:
                    param.normal_(0.0, std)


def parameter_counts(model):
    count = lambda *modules: sum(p.numel() for m in modules for p in m.parameters())
    vision = count(model.vision)
    qformer = count(model.qformer, model.vlm_att_ln) + model.vlm_att_query.numel()
    projectors = count(
        model.vlm_att_projector,
        model.vlm_att_key_projector,
        model.vlm_att_val_projector,
        model.mm_projector,
    )
    llm = count(model.llm)
    return {
        "vision": vision,
        "qformer": qformer,
        "projectors": projectors,
        "llm": llm,
        "total": count(model),
    }


# ----------------------------------------------------------------------------------------------
# Timing, as cpu_bench does it.


def measure(repeats, run):
    """One warm-up call, then `repeats` calls; the median of each duration `run` returns."""
    run()
    samples = [run() for _ in range(repeats)]
    return [statistics.median(column) for column in zip(*samples)]


def encode_stages(model, pixels, qformer_ids):
    """One batch through the encoder, timed by stage: vision tower, Q-Former (with its input
    norm), the rest (projections, context attention, pooling, mm_projector)."""
    start = time.perf_counter()
    features = model.vision(pixels)
    vision = time.perf_counter() - start
    t = time.perf_counter()
    queries = model.qformer_queries(features, qformer_ids)
    qformer = time.perf_counter() - t
    t = time.perf_counter()
    tokens = model.frame_tokens(features, queries)
    tokens.sum().item()
    rest = time.perf_counter() - t
    return time.perf_counter() - start, vision, qformer, rest


def caption(llm, embeds, new_tokens):
    """Prefill, then greedy decoding of `new_tokens` tokens ignoring EOS: token 1 from the
    prefill logits, tokens 2.. from single-token forwards with the KV cache. Returns
    (prefill s, decode s per token, total s)."""
    start = time.perf_counter()
    out = llm(inputs_embeds=embeds, use_cache=True, return_dict=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    token.item()
    past = out.past_key_values
    prefill = time.perf_counter() - start
    decode_start = time.perf_counter()
    for _ in range(1, new_tokens):
        out = llm(input_ids=token, past_key_values=past, use_cache=True, return_dict=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        past = out.past_key_values
    token.item()
    decode = time.perf_counter() - decode_start
    return prefill, decode / max(new_tokens - 1, 1), time.perf_counter() - start


def decode_batch(llm, embeds, batch, steps):
    """`batch` copies of the sequence prefilled together, then `steps` decode steps of all of
    them in one forward each; the median step time."""
    out = llm(inputs_embeds=embeds.expand(batch, -1, -1), use_cache=True, return_dict=True)
    tokens = out.logits[:, -1].argmax(-1, keepdim=True)
    past = out.past_key_values
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = llm(input_ids=tokens, past_key_values=past, use_cache=True, return_dict=True)
        tokens = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.sum().item()
        past = out.past_key_values
        times.append(time.perf_counter() - start)
    return (statistics.median(times),)


def prefill_only(llm, embeds):
    start = time.perf_counter()
    out = llm(inputs_embeds=embeds, use_cache=True, return_dict=True)
    out.logits[:, -1].argmax(-1).item()
    return (time.perf_counter() - start,)


# ----------------------------------------------------------------------------------------------
# The machine and the process.


def status_kib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_kib():
    # ru_maxrss is in KiB on Linux; VmHWM is the same high-water mark.
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, status_kib("VmHWM:"))


def gib(kib):
    return kib / (1024 * 1024)


def cpu_seconds():
    """Busy CPU seconds of the whole machine (/proc/stat) and of this process: their difference
    over a run is what other processes took meanwhile."""
    total = 0.0
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
        total = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    own = os.times()
    return total, own.user + own.system


def machine_speed():
    """Best of 5 of a 2048³ f32 product through torch (ms), and the rate of summing 512 MiB
    (GB/s), on torch's threads."""
    a = torch.randn(2048, 2048)
    b = torch.randn(2048, 2048)
    out = torch.empty(2048, 2048)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t)
    words = torch.ones(64 << 20, dtype=torch.int64)
    words.sum().item()
    t = time.perf_counter()
    words.sum().item()
    gbps = words.numel() * 8 / (time.perf_counter() - t) * 1e-9
    return {"f32_2048_ms": best * 1e3, "read_gb_per_s": gbps}


def cpu_description():
    name, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == "unknown":
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
    return name, [f for f in wanted if f in flags]


def torch_build_info():
    config = torch.__config__.show()
    lines = [line.strip(" -") for line in config.splitlines()]
    pick = lambda key: next((l for l in lines if key in l), "not reported")
    env_names = (
        "ATEN_CPU_CAPABILITY",
        "MKL_ENABLE_INSTRUCTIONS",
        "DNNL_MAX_CPU_ISA",
        "ONEDNN_MAX_CPU_ISA",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
    )
    return {
        "torch": torch.__version__,
        "mkl_available": torch.backends.mkl.is_available(),
        "mkl": pick("Math Kernel Library"),
        "mkldnn": pick("MKL-DNN"),
        "cpu_capability": pick("CPU capability usage"),
        "env": {name: os.environ[name] for name in env_names if name in os.environ},
    }


def main():
    args = parse_args()
    shape = json.loads(args.shape.read_text())
    threads = args.threads or int(shape.get("threads", 2))
    torch.set_num_threads(threads)
    if shape.get("dtype", "float32") != "float32":
        sys.exit(f"{args.shape}: dtype {shape['dtype']}: this reference runs float32 only")
    wants = lambda figure: args.only is None or figure in args.only

    import transformers

    info = torch_build_info()
    cpu_name, cpu_flags = cpu_description()
    print(
        f"torch {info['torch']}, transformers {transformers.__version__}, python {sys.version.split()[0]}"
    )
    print(f"MKL available: {info['mkl_available']} ({info['mkl']})")
    print(f"oneDNN: {info['mkldnn']}")
    print(f"ATen: {info['cpu_capability']}")
    env = info["env"]
    print(
        "env: "
        + (
            ", ".join(f"{k}={v}" for k, v in env.items())
            if env
            else "(no ISA or thread variables set)"
        )
    )
    print(f"CPU: {cpu_name}; flags: {' '.join(cpu_flags)}; threads: {torch.get_num_threads()}")

    speed_at_start = machine_speed()
    cpu_at_start = cpu_seconds()
    wall_start = time.perf_counter()

    work = shape["workload"]
    llm_ids = [int(i) for i in work["llm_input_ids"]]
    if llm_ids.count(-200) != 1:
        sys.exit(f"{args.shape}: workload.llm_input_ids must hold the image marker -200 once")
    qformer_ids = torch.tensor([work["qformer_input_ids"]], dtype=torch.long)
    new_tokens = int(work["decode"]["new_tokens"])
    video_rows = int(work["window_frames"]) * int(work["tokens_per_frame"])

    t = time.perf_counter()
    torch.manual_seed(int(shape["init"]["seed"]))
    with default_init_skipped():
        model = LlamaVidReference(shape)
    random_init(model, 0.02)
    model.eval()
    build_s = time.perf_counter() - t
    rss_after_build = status_kib("VmRSS:")
    peak_after_build = peak_rss_kib()
    counts = parameter_counts(model)
    expected = shape.get("param_counts", {})
    print(
        f"model build (random init) {build_s:.2f} s, RSS after build {gib(rss_after_build):.2f} GiB"
    )
    print("parameters (json's param_counts):")
    for part, n in counts.items():
        want = expected.get(part)
        note = "" if want is None else (" (match)" if want == n else f" (json {want:,}: DIFFERS)")
        print(f"  {part:<11} {n:>15,}{note}")

    size = shape["vision"]["image_size"]
    hidden = shape["llm"]["hidden"]
    results = {"parameter_counts": counts}
    table = [("model build (random init)", build_s, "s")]

    with torch.inference_mode():
        if wants("encode") or wants("encode1"):
            one = torch.randn(1, 3, size, size)

            def encode_one():
                t = time.perf_counter()
                model.encode(one, qformer_ids).sum().item()
                return (time.perf_counter() - t,)

            (enc1,) = measure(args.repeats, encode_one)
            table.append(("encode 1 frame", enc1, "s"))
            results["encode_one_frame_s"] = enc1

        if wants("encode") or wants("encode8"):
            eight = torch.randn(8, 3, size, size)
            total, vision, qformer, rest = measure(
                args.repeats, lambda: encode_stages(model, eight, qformer_ids)
            )
            table += [
                ("encode per frame, batch 8", total / 8, "s"),
                ("  vision tower", vision / 8, "s"),
                ("  Q-Former", qformer / 8, "s"),
                ("  rest (projections, pooling)", rest / 8, "s"),
            ]
            results["encode_batch8"] = {
                "batch8_per_frame_s": total / 8,
                "batch8_vision_per_frame_s": vision / 8,
                "batch8_qformer_per_frame_s": qformer / 8,
                "batch8_rest_per_frame_s": rest / 8,
            }

        if wants("caption"):
            embeds = model.input_embeddings(llm_ids, torch.randn(video_rows, hidden))
            length = embeds.shape[1]
            prefill, per_token, total = measure(
                args.repeats, lambda: caption(model.llm, embeds, new_tokens)
            )
            table += [
                (f"caption prefill ({length} tokens)", prefill, "s"),
                ("decode per token", per_token, "s"),
                (f"{new_tokens}-token caption total", total, "s"),
            ]
            results["caption"] = {
                "prefill_len": length,
                "prefill_s": prefill,
                "decode_per_token_s": per_token,
                "new_tokens": new_tokens,
                "total_s": total,
            }

        if wants("batch"):
            embeds = model.input_embeddings(llm_ids, torch.randn(video_rows, hidden))
            steps = min(new_tokens, 16)
            (one,) = measure(args.repeats, lambda: decode_batch(model.llm, embeds, 1, steps))
            (four,) = measure(args.repeats, lambda: decode_batch(model.llm, embeds, 4, steps))
            table += [
                ("decode step, batch 1", one, "s"),
                ("decode step, batch 4", four, "s"),
                ("  per token at batch 4", four / 4, "s"),
                ("  tokens/s batch 4 vs batch 1", 4 * one / four, "x"),
            ]
            results["decode_batch"] = {
                "steps": steps,
                "batch1_step_s": one,
                "batch4_step_s": four,
                "speedup": 4 * one / four,
            }

        if wants("baseline"):
            base = work["baseline_full_tokens"]
            frames = int(base["frames"])
            full = model.input_embeddings(
                llm_ids, torch.randn(frames * int(base["tokens_per_frame"]), hidden)
            )
            ours = model.input_embeddings(
                llm_ids, torch.randn(frames * int(work["tokens_per_frame"]), hidden)
            )
            (full_s,) = measure(args.repeats, lambda: prefill_only(model.llm, full))
            (ours_s,) = measure(args.repeats, lambda: prefill_only(model.llm, ours))
            table += [
                (
                    f"prefill {frames} frames x {base['tokens_per_frame']} tok ({full.shape[1]})",
                    full_s,
                    "s",
                ),
                (
                    f"prefill {frames} frames x {work['tokens_per_frame']} tok ({ours.shape[1]})",
                    ours_s,
                    "s",
                ),
                ("  ratio", full_s / ours_s, "x"),
            ]
            results["baseline_prefill"] = {
                "frames": frames,
                "full_len": full.shape[1],
                "full_s": full_s,
                "llamavid_len": ours.shape[1],
                "llamavid_s": ours_s,
                "ratio": full_s / ours_s,
            }

    peak = peak_rss_kib()
    cpu_at_end = cpu_seconds()
    wall = time.perf_counter() - wall_start
    own = cpu_at_end[1] - cpu_at_start[1]
    foreign = max((cpu_at_end[0] - cpu_at_start[0]) - own, 0.0)
    print(
        f"\nCPU use over the run ({wall:.0f} s wall): this process {own / wall:.2f} cores, other "
        f"processes {foreign / wall:.2f} cores (anything above ~0.05 means the figures are disturbed)"
    )
    speed_at_end = machine_speed()
    for when, speed in (("start", speed_at_start), ("end", speed_at_end)):
        print(
            f"machine speed at the {when}: 2048³ f32 product {speed['f32_2048_ms']:.1f} ms "
            f"({GEMM_FLOP / speed['f32_2048_ms'] * 1e-6:.0f} GFLOP/s), memory read "
            f"{speed['read_gb_per_s']:.1f} GB/s"
        )
        results[f"machine_speed_{when}"] = speed
    table += [
        ("peak resident memory", gib(peak), "GiB"),
        ("  after build", gib(peak_after_build), "GiB"),
    ]

    print(
        f"\n{'figure':<36} {'value':>10}   (PyTorch f32, {threads} threads, median of "
        f"{args.repeats} after 1 warm-up)"
    )
    for name, value, unit in table:
        print(f"{name:<36} {value:>10.3f} {unit}")

    if args.json is not None:
        results.update(
            {
                "implementation": "pytorch-reference",
                "precision": "f32",
                "threads": threads,
                "repeats": args.repeats,
                "build_s": build_s,
                "peak_rss_gib": gib(peak),
                "peak_rss_after_build_gib": gib(peak_after_build),
                "rss_after_build_gib": gib(rss_after_build),
                "own_cpu_cores": own / wall,
                "foreign_cpu_cores": foreign / wall,
                "cpu": cpu_name,
                "cpu_flags": cpu_flags,
                "transformers": transformers.__version__,
                **info,
            }
        )
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
