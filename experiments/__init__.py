"""The experiments behind docs/results.md, kept in the checkout and out of the installed package
(as torchvision keeps references/detection/): the config generators, the grid launcher, the
comparison report and the CPU study. Run its commands from the checkout's root:
``python -m experiments.gen_configs``, ``python -m experiments.compare_ap``."""
