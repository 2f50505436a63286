"""turbotvm vs PyTorch SDPA on this GPU: see turbotvm/bench.py (also `turbotvm bench`)."""

from turbotvm.bench import main

if __name__ == "__main__":
    main()
