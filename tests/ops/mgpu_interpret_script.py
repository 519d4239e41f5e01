"""One case of test_block_sparse_mgpu.INTERPRET_CASES in Mosaic GPU's interpreter, in its own
process (see INTERPRET_ENV there for why): outputs, LSE and gradients against the reference.

    python mgpu_interpret_script.py CASE SEED   -> "PASSED CASE", or an assertion error
"""

import sys

import numpy as np

from tests.ops.test_block_sparse_mgpu import INTERPRET_CASES, check_case

if __name__ == "__main__":
    case, seed = map(int, sys.argv[1:])
    print(f"seed={seed}")
    check_case(INTERPRET_CASES[case], np.random.default_rng(seed), interpret=True)
    print(f"PASSED {case}")
