"""Link backends, one module per URL scheme family (imported lazily by hw.connect/listen)."""
