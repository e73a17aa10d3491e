"""Azure confidential VMs: the vTPM quote over the HCL report (SNP or TDX underneath)."""
