"""Quality evaluation: what a compression setting (KV codec, weight format, eviction) costs.

`corpora` (real text from installed packages), `configs` (named EngineConfig overrides),
`ppl` (perplexity, KL and top-1 agreement by teacher-forced decode over the paged KV cache),
`needle` (passkey retrieval per length and depth), `plots` (PNG figures), `results` (JSON and
markdown with the environment), `cli` (`bitfold eval corpora|ppl|needle`).
"""
