"""Storage tiers: GPU and host slab pools, the disk store and its codec. Tiers store; they never choose."""
