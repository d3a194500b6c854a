"""The thin runtime: KV caches, decode sessions, and (later) kernel launch and the DFlash loop."""
