# The two commands of the README. Both install what they need into .venv first.
.PHONY: quickstart test install docs

install:
	@bash scripts/bootstrap.sh

quickstart: install
	.venv/bin/kdlm quickstart

test: install
	@bash .ci/install_chromium.sh
	.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15

docs: install
	.venv/bin/kdlm config-reference --output docs/reference/config.md
	.venv/bin/kdlm cli-reference --output docs/reference/cli.md
