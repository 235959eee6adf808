"""Load each model folder given on the command line with vLLM in-process and print one JSON line per model:
"distill-result: " + {"model": folder, "text": greedy completion of a fixed chat prompt, "tokens": N}.

Run as a script (vLLM spawns worker processes, so it needs the `__main__` guard).
"""

from __future__ import annotations

import gc
import json
import sys

RESULT = "distill-result: "
PROMPT = [{"role": "user", "content": "What is 12 + 30? Put the final answer in \\boxed{}."}]


def main(folders: list[str]) -> None:
    from vllm import LLM, SamplingParams

    for folder in folders:
        llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=4, seed=0)
        out = llm.chat([PROMPT], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0]
        print(RESULT + json.dumps({"model": folder, "text": out.text, "tokens": len(out.token_ids)}), flush=True)
        del llm
        gc.collect()


if __name__ == "__main__":
    main(sys.argv[1:])
