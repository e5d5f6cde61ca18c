"""llama.cpp's side of the GGUF comparison (gst-tests/llama-cpp-check.sh).

    referee.py --model FILE.gguf --out FILE.json (--texts | --random-ids N) [--new 32] [--threads 2]

For each prompt it records the ids fed, the prefill's last-position logits, and the greedy
continuation of --new ids (EOS ignored) with llama.cpp's top-2 logit margin at every step, as
JSON. The prompts are English texts tokenized by llama.cpp (--texts), or N seeded random id
sequences over the model's vocabulary (--random-ids, for random-weight exports whose vocabulary
has no meaning).

The KV cache is f32 (type_k = type_v = GGML_TYPE_F32) and flash attention is off, so llama.cpp's
attention runs in f32 as ours does: the comparison then measures the quantized products, which is
what it is for, rather than llama.cpp's default f16 cache.
"""

import argparse
import json
import random
import sys

import numpy as np
from llama_cpp import Llama, llama_print_system_info, __version__

GGML_TYPE_F32 = 0

TEXTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "To make a cup of tea, first",
    "The three primary colors are",
    "def fibonacci(n):\n",
    "Water boils at a temperature of",
    "The quick brown fox",
    "In 1969, the first humans to walk on the Moon were",
    "A healthy breakfast usually includes",
    "The most important rule of driving in the rain is",
    "Photosynthesis is the process by which plants",
    "Here is a list of fruits: apple, banana,",
    "The video shows a man walking his dog in the park. He",
    "Question: What is 12 plus 7?\nAnswer:",
    "My favourite season is autumn because",
    "The train left the station at noon and",
    "<|im_start|>user\nWhat is the tallest mountain in the world?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nDescribe a sunset in one sentence.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nGive me three tips for learning a new language.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat does a camera do?<|im_end|>\n<|im_start|>assistant\n",
    "Security camera footage from the parking lot shows",
    "The recipe calls for two cups of flour, one egg and",
    "Scientists have discovered a new species of",
    "import numpy as np\nx = np.",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--texts", action="store_true")
    group.add_argument("--random-ids", type=int, metavar="N")
    args = ap.parse_args()

    llm = Llama(
        model_path=args.model,
        n_ctx=512,
        n_batch=512,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        logits_all=True,
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
        flash_attn=False,
        verbose=False,
    )
    vocab = llm.n_vocab()
    if args.texts:
        prompts = [llm.tokenize(t.encode(), add_bos=True, special=True) for t in TEXTS]
    else:
        rng = random.Random(1234)
        prompts = [
            [rng.randrange(3, vocab) for _ in range(rng.randrange(4, 40))]
            for _ in range(args.random_ids)
        ]

    records = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        prefill = logits.copy()
        greedy, margins = [], []
        for step in range(args.new):
            top2 = np.argsort(-logits, kind="stable")[:2]
            greedy.append(int(top2[0]))
            margins.append(float(logits[top2[0]] - logits[top2[1]]))
            if step + 1 < args.new:
                llm.eval([int(top2[0])])
                logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        records.append(
            {
                "ids": [int(i) for i in ids],
                "prefill_logits": prefill.tolist(),
                "greedy": greedy,
                "margins": margins,
            }
        )
    json.dump(
        {
            "llama_cpp_python": __version__,
            "system_info": llama_print_system_info().decode(),
            "model": args.model,
            "vocab": vocab,
            "prompts": records,
        },
        open(args.out, "w"),
    )
    print(f"referee: {len(records)} prompts x {args.new} tokens from {args.model}", file=sys.stderr)


if __name__ == "__main__":
    main()
