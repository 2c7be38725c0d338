"""Demo tooling, outside the core packages: the embedded synthetic cross-age face set
(`mtmim synth`, `make demo`). Nothing in data/, models/, eval/ or train/ imports it."""
