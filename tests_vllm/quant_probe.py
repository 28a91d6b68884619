"""Serve a tiny zoo model offline with ``quantization="mmkernels-..."``; print what happened as JSON.

    python tests_vllm/quant_probe.py MODEL_DIR FAMILY METHOD

Registers mmkernels' quantization methods itself (:func:`register_quantization`; the
plugin's ``register()`` is not relied on) and runs the engine in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0`` from the caller), so :func:`vllm_quant.stats` sees
the model's layers. Prints one line ``PROBE {json}``: the greedy tokens of run_offline's
prompts and the quantization record (quantized / unquantized / skipped layers, calls).
"""

from __future__ import annotations

import json
import sys


def main(model: str, family: str, method: str) -> None:
    from mmkernels.integrations.vllm import quant as vllm_quant
    import run_offline

    summary = vllm_quant.register_quantization()
    llm = run_offline.make_llm(model, quantization=method)
    results = run_offline.generate_greedy(llm, family)
    rows = [
        {"name": name, "token_ids": list(r.outputs[0].token_ids)} for name, r in zip(run_offline.IMAGE_SIZES, results)
    ]
    quant = llm.llm_engine.vllm_config.quant_config
    facts = {
        "registered": summary,
        "quant_config": repr(quant),
        "quant_name": quant.get_name() if quant is not None else None,
        "rows": rows,
        "stats": vllm_quant.stats(),
    }
    print("PROBE " + json.dumps(facts), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
