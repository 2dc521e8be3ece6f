"""Structure: turn an unstructured mask into a hardware-friendly one.

refill (whole channels, paper Alg. 2), regroup (dense blocks by hypergraph partitioning,
Alg. 3), channel couplings found from the model's graph."""
