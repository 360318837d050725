//! Load balancing: power of two choices over peak-EWMA latency.
