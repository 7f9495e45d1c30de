"""renoise: ReNoise real-image inversion for diffusion models, in plain PyTorch.

`models/` and `kernels/` are top-level folders installed as `renoise.models` and
`renoise.kernels`, so that a user's own `models` package is never shadowed.
"""
from setuptools import find_packages, setup

FOLDERS = {"renoise": "renoise", "renoise.models": "models", "renoise.kernels": "kernels"}


def packages():
    found = []
    for name, folder in FOLDERS.items():
        found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(folder)]
    return found


def package_dir():
    mapping = {}
    for name in packages():
        top = next(n for n in sorted(FOLDERS, key=len, reverse=True) if name == n or name.startswith(n + "."))
        mapping[name] = FOLDERS[top] + name[len(top):].replace(".", "/")
    return mapping


setup(
    name="renoise",
    version="0.1.0",
    description="ReNoise: real-image inversion of diffusion models by iterative renoising",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=packages(),
    package_dir=package_dir(),
    package_data={"renoise.demo": ["MODEL_CARD.md", "weights/*.json", "weights/*.md", "weights/*.png",
                                   "weights/*/*.json", "weights/*/*.txt", "weights/*/*.safetensors",
                                   "FLOW_MODEL_CARD.md", "flow_weights/*.json", "flow_weights/*.md",
                                   "flow_weights/*.png", "flow_weights/*/*.json", "flow_weights/*/*.txt",
                                   "flow_weights/*/*.safetensors"]},
    install_requires=[          # minimums tested by .ci/minimums (pinned in .ci/minimums.txt)
        "torch>=2.13",
        "numpy>=1.26.4",
        "einops>=0.7",
        "safetensors>=0.8.0",
        "huggingface-hub>=2.4.0",
        "tqdm>=4.66.1",
        "pillow>=10.1",
    ],
    extras_require={
        "test": ["pytest", "hypothesis", "diffusers", "transformers", "peft", "matplotlib",
                 "scikit-image",                                    # the 'photos' evaluation set
                 "triton; platform_system == 'Linux'",      # triton: the kernels' interpreter tests
                 "tokenizers", "sentencepiece", "protobuf"],  # the T5 tokenizer and its oracle's training
        "t5": ["tokenizers"],          # the T5 tokenizer of SD3 / FLUX.1 (renoise.models.t5_tokenizer)
        "gpu": ["triton"],
    },
    entry_points={"console_scripts": ["renoise=renoise.__main__:main"]},
)
