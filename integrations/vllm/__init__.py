"""mmkernels in vLLM: the ``vllm.general_plugins`` entry point (:mod:`.plugin`, whose
``register`` vLLM calls in every process), one adapter module per replacement
(:mod:`.merge`, :mod:`.patch_embed`, :mod:`.encoder_attention`) and the projector
quantization methods (:mod:`.quant`, ``--quantization mmkernels-*``).

This subpackage needs only mmkernels' ops, :mod:`mmkernels.quant` and vLLM: it never
imports the Hugging Face side (:mod:`mmkernels.integrations.hf`), so a vLLM process loads
no patch engine and no transformers model code of mmkernels' own
(``tests/test_source_tree.py`` counts the modules).
"""
