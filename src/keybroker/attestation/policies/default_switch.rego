# Keybroker default attestation policy for NVSwitch devices (policy id "default", class
# "switch"), doing what upstream's ear_default_policy_switch.rego does. Switch claims come only
# from NVIDIA's NRAS (nvidia_verifier type = "Remote").
package policy

import rego.v1

default hardware := 97

default executables := 33

default configuration := 36

trust_claims := {
	"instance-identity": 0,
	"configuration": configuration,
	"executables": executables,
	"file-system": 0,
	"hardware": hardware,
	"runtime-opaque": 0,
	"storage-opaque": 0,
	"sourced-data": 0,
}

hardware := 2 if {
	input.sampledevice.svn in query_reference_value("device_svn")
}

# --- switches appraised by NRAS ---------------------------------------------------------

hardware := 2 if {
	input.nvidia["x-nvidia-switch-attestation-report-cert-chain"]["x-nvidia-cert-ocsp-status"] == "good"
	input.nvidia["x-nvidia-switch-attestation-report-cert-chain"]["x-nvidia-cert-status"] == "valid"
	input.nvidia["x-nvidia-switch-attestation-report-cert-chain-fwid-match"] == true
	input.nvidia["x-nvidia-switch-attestation-report-parsed"] == true
	input.nvidia["x-nvidia-switch-attestation-report-signature-verified"] == true
	input.nvidia["x-nvidia-switch-arch-check"] == true
}

configuration := 2 if {
	input.nvidia.secboot == true
	input.nvidia.dbgstat == "disabled"
	input.nvidia["x-nvidia-switch-bios-version"] in query_reference_value("allowed_switch_bios_versions")
} else := 3 if {
	input.nvidia.secboot == true
	input.nvidia.dbgstat == "disabled"
}

executables := 3 if {
	input.nvidia["x-nvidia-switch-bios-rim-cert-chain"]["x-nvidia-cert-ocsp-status"] == "good"
	input.nvidia["x-nvidia-switch-bios-rim-cert-chain"]["x-nvidia-cert-status"] == "valid"
	every check in ["fetched", "measurements-available", "schema-validated", "signature-verified", "version-match"] {
		input.nvidia[concat("-", ["x-nvidia-switch-bios-rim", check])] == true
	}
	input.nvidia.measres == "success"
}
