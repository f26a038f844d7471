"""Token compression: pure token ops, patch settings, schedules and MACs, the timm patch, lookup tables."""
