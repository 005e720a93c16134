"""One answer per model fact: devices, dtypes, decoder blocks, tensor tables, DTensor access."""
