"""`python -m renoise eval`: invert a data set with a grid of methods, sharded over processes with
torch.distributed, resumable; per-image rows, a summary and plots. See docs/eval.md.

    methods   named Plan overrides and built-in grids (the --methods syntax)
    data      the images: a folder with captions, one prompt for all, or held-out demo scenes
    measure   one (image, method) pair: invert, reconstruct, edit, and the numbers
    store     the output folder: rows appended atomically, files renamed into place, run.json
    summary   per-method statistics, summary.json and summary.md
    plots     PSNR (and latent PSNR) against model calls, residual curves, the image grid (matplotlib, optional)
    distributed  torchrun's process group (NCCL on GPUs, gloo on CPU)
    flows     flow-matching models (SD3 / FLUX.1): what the model is before loading, what cannot run on it
    cli       the arguments and the run
"""
