"""Everything that needs root and BCC: BTF, the kernel water probe, Go binaries, samplers.
Nothing outside this package imports bcc."""
