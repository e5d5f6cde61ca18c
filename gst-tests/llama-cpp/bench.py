"""llama.cpp's speed on a GGUF file, for plugin/benches/gguf_bench.rs (not a test).

    bench.py --model FILE.gguf --threads 2 --pp 128 --tg 128 --reps 1

Like llama-bench: pp = one batch of --pp random ids from an empty context; tg = --tg ids
decoded one at a time from an empty context. llama.cpp's defaults otherwise (f16 KV cache),
as its users run it. Prints one JSON object with tokens per second of each repetition.
"""

import argparse
import json
import random
import time

from llama_cpp import Llama

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--pp", type=int, default=128)
ap.add_argument("--tg", type=int, default=128)
ap.add_argument("--reps", type=int, default=1)
args = ap.parse_args()

llm = Llama(model_path=args.model, n_ctx=max(args.pp, args.tg) + 16, n_batch=args.pp,
            n_ubatch=args.pp, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
rng = random.Random(0)
ids = [rng.randrange(3, llm.n_vocab()) for _ in range(max(args.pp, args.tg))]
pp, tg = [], []
for _ in range(args.reps):
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids[: args.pp])
    pp.append(args.pp / (time.perf_counter() - t))
    llm.reset()
    t = time.perf_counter()
    for i in ids[: args.tg]:
        llm.eval([i])
    tg.append(args.tg / (time.perf_counter() - t))
print(json.dumps({"pp_tps": pp, "tg_tps": tg}))
