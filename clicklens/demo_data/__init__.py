"""The demo world of `clicklens generate-demo-data`: images, catalog, search logs, ground truth.

`world` holds the attribute vocabulary (English and Chinese) and query synthesis,
`images` draws the PNGs, `click_model` ranks and clicks, `malformed` breaks
log lines on purpose, and `generate` writes everything under <workdir>/raw.
"""
