#!/usr/bin/env python3
"""Checks that torch_cpu_bench.py's model computes what the LLaMA-VID reference code computes:
loads a tiny fixture of ../shared/fixtures (tensors recorded by running the original code) into
the benchmark's `LlamaVidReference` and compares every stage, each fed the recorded input of
that stage, with the fixture's tolerances (f32: 1e-4 relative to max(1, max|reference|), 1e-3
for pixels -> video tokens) and the greedy ids exactly. Exit status 1 when any stage is off.

    plugin/scripts/torch-ref-env.sh --check-fixture [../shared/fixtures/llamavid-tiny-a]

(or run this file with the venv's python). The benchmark's timings are only meaningful if this
passes: it shows the operations, weight layout and token splicing are the reference's.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_cpu_bench as bench  # noqa: E402

DEFAULT_FIXTURE = bench.REPO.parent / "shared" / "fixtures" / "llamavid-tiny-a"


def model_dir(fixture):
    dirs = [p for p in fixture.iterdir() if (p / "pytorch_model.bin.index.json").is_file()]
    if len(dirs) != 1:
        sys.exit(f"{fixture}: expected one model directory with pytorch_model.bin.index.json")
    return dirs[0]


def fixture_shape(fixture, weights):
    """The benchmark's shape dict for this fixture, from meta.json, the configs and the weights."""
    meta = json.loads((fixture / "meta.json").read_text())
    config = json.loads((model_dir(fixture) / "config.json").read_text())
    bert = json.loads((fixture / "bert-base-uncased" / "config.json").read_text())
    shape_of = lambda name: list(weights[name].shape)
    vis, qf, llm = meta["vision"], meta["qformer"], meta["llm"]
    return {
        "vision": {
            "width": vis["width"],
            "patch_size": meta["patch_size"],
            "tokens_with_cls": meta["num_patches"] + 1,
            "heads": vis["heads"],
            "mlp_hidden": vis["mlp_hidden"],
            "ln_eps": vis["ln_eps"],
            "depth_used": vis["depth_used"],
        },
        "qformer": {
            "vocab": qf["vocab_with_dec"],
            "hidden": qf["hidden"],
            "layers": qf["layers"],
            "heads": qf["heads"],
            "intermediate": qf["intermediate"],
            "max_position": bert["max_position_embeddings"],
            "ln_eps": qf["ln_eps"],
            "cross_attention_freq": qf["cross_attention_freq"],
            "encoder_width": config["mm_hidden_size"],
            "vision_ln": {"dim": config["mm_hidden_size"], "eps": 1e-5},
        },
        "projectors": {
            "mm_projector": {
                "type": config["mm_projector_type"],
                "shapes": [
                    shape_of("model.mm_projector.0.weight"),
                    shape_of("model.mm_projector.2.weight"),
                ],
            },
            "vlm_att_projector": {"shape": shape_of("model.vlm_att_projector.weight")},
            "vlm_att_key_projector": {"shape": shape_of("model.vlm_att_key_projector.weight")},
            "vlm_att_val_projector": {"shape": shape_of("model.vlm_att_val_projector.weight")},
            "vlm_att_query": shape_of("model.vlm_att_query"),
            "compress_type": config["compress_type"],
        },
        "llm": {
            "vocab": llm["vocab"],
            "hidden": llm["hidden"],
            "intermediate": llm["intermediate"],
            "layers": llm["layers"],
            "heads": llm["heads"],
            "kv_heads": llm["kv_heads"],
            "act": config["hidden_act"],
            "max_position": config["max_position_embeddings"],
            "rms_eps": llm["rms_eps"],
            "rope_theta": llm["rope_theta"],
            "tie_word_embeddings": config["tie_word_embeddings"],
        },
    }


def benchmark_name(release_name):
    """The benchmark model's parameter name for a release checkpoint name (None: not a weight)."""
    if release_name.endswith(("position_ids", "rotary_emb.inv_freq")):
        return None  # buffers the modules compute themselves
    qformer = "model.vlm_att_encoder.bert."
    if release_name.startswith(qformer):
        name = release_name[len(qformer) :]
        # LAVIS's BertAttention holds `self`; transformers' InstructBLIP calls it `attention`.
        name = name.replace(".attention.self.", ".attention.attention.")
        name = name.replace(".crossattention.self.", ".crossattention.attention.")
        name = name.replace("embeddings.LayerNorm.", "embeddings.layernorm.")
        return "qformer." + name
    for projector in ("vlm_att_", "mm_projector"):
        if release_name.startswith("model." + projector):
            return release_name[len("model.") :]
    return "llm." + release_name


def load_fixture_weights(model, fixture):
    from safetensors.torch import load_file

    weights = load_file(str(model_dir(fixture) / "model.safetensors"))
    eva = torch.load(fixture / "model_zoo" / "LAVIS" / "eva_vit_g.pth", map_location="cpu")
    state = {}
    for name, tensor in weights.items():
        target = benchmark_name(name)
        if target is not None:
            state[target] = tensor.float()
    depth = len(model.vision.blocks)
    for name, tensor in eva.items():
        # The file holds one block more than the reference builds (the "second-to-last layer").
        if name.startswith("blocks.") and int(name.split(".")[1]) >= depth:
            continue
        state["vision." + name] = tensor.float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Non-persistent buffers are not in the state dict; every parameter must be loaded.
    missing = [m for m in missing if m in dict(model.named_parameters())]
    if missing or unexpected:
        sys.exit(
            f"weights do not fit the benchmark model: missing {missing}, unexpected {unexpected}"
        )


def main():
    fixture = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_FIXTURE
    from safetensors.torch import load_file

    reference = load_file(str(fixture / "reference.safetensors"))
    weights = load_file(str(model_dir(fixture) / "model.safetensors"))
    model = bench.LlamaVidReference(fixture_shape(fixture, weights))
    load_fixture_weights(model, fixture)
    model.eval()
    r = reference.__getitem__
    failures = 0

    def compare(stage, ours, tolerance):
        nonlocal failures
        ref = r(stage).float()
        if tuple(ours.shape) != tuple(ref.shape):
            print(f"{stage:<18} shape {tuple(ours.shape)} != reference {tuple(ref.shape)}  FAIL")
            failures += 1
            return
        err = (ours.float() - ref).abs().max().item()
        rel = err / max(1.0, ref.abs().max().item())
        ok = rel <= tolerance
        failures += not ok
        print(
            f"{stage:<18} max abs err {err:.3e}, relative {rel:.3e} (tolerance {tolerance:g})  {'ok' if ok else 'FAIL'}"
        )

    with torch.inference_mode():
        ids = r("qformer_input_ids").long()
        features = model.vision(r("pixel_values").float())
        compare("vision_features", features, 1e-4)
        compare("qformer_visual_input", model.vlm_att_ln(r("vision_features").float()), 1e-4)
        queries = model.qformer_queries(r("vision_features").float(), ids)
        compare("qformer_output", queries, 1e-4)
        tokens = model.frame_tokens(r("vision_features").float(), r("qformer_output").float())
        compare("video_tokens", tokens.reshape(-1, tokens.shape[-1]), 1e-4)
        from_pixels = model.encode(r("pixel_values").float(), ids)
        compare("video_tokens", from_pixels.reshape(-1, from_pixels.shape[-1]), 1e-3)
        llm_ids = [int(i) for i in r("input_ids").flatten()]
        embeds = model.input_embeddings(llm_ids, r("video_tokens").float())
        compare("inputs_embeds", embeds, 1e-6)
        logits = model.llm(inputs_embeds=r("inputs_embeds").float(), use_cache=True).logits
        compare("logits", logits, 1e-4)

        # The benchmark's decoding loop, recording what it computes at each step.
        expected = [int(i) for i in r("generated_ids")]
        out = model.llm(inputs_embeds=r("inputs_embeds").float(), use_cache=True, return_dict=True)
        step_logits, generated = [out.logits[0, -1]], []
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        generated.append(int(token))
        for _ in range(1, len(expected)):
            out = model.llm(
                input_ids=token,
                past_key_values=out.past_key_values,
                use_cache=True,
                return_dict=True,
            )
            step_logits.append(out.logits[0, -1])
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            generated.append(int(token))
        compare("step_logits", torch.stack(step_logits), 1e-4)
        same = generated == expected
        failures += not same
        print(
            f"{'generated_ids':<18} {generated} {'==' if same else '!='} reference {expected}  {'ok' if same else 'FAIL'}"
        )

    print(
        f"{fixture.name}: {'all stages match the reference' if not failures else f'{failures} stage(s) FAILED'}"
    )
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
