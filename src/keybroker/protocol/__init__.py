"""Wire models and pure protocol functions (canonical JSON, runtime-data hashing, JWE, JWS,
resource paths). No I/O."""
