"""Evaluation of teachers and distilled students (`kdlm eval`).

- tasks: YAML task files (built-in ones in tasks/*.yaml) and their examples;
- scoring: generation, option / continuation log-likelihoods, token-level agreement with the teacher;
- metrics: ROUGE-L, exact match, token F1, accuracy, perplexity, ECE, retention, drops, attack success rate;
- robustness: seeded char/word/sentence perturbations of task inputs;
- efficiency: parameters, disk size, peak memory, latency per token, throughput;
- harness: optional lm-evaluation-harness tasks folded into the summary;
- run / cli: the whole evaluation and its command line (`add_eval_parser`, `run_eval_command`).

See docs/guides/evaluation.md and docs/reference/task_files.md.
"""
