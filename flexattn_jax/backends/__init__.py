"""Implementations of flex attention. Each module takes plain arrays and static configuration; none imports another."""
