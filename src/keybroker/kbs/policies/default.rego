# Keybroker default resource policy.
#
# Releases resources (plugin "resource") to any attested guest, except one whose evidence came
# from the software-only "sample" TEE: sample evidence proves nothing about the hardware.
#
# input: the attestation token's claims; data: {"plugin", "resource-path", "query"}.
package policy

import rego.v1

default allow := false

allow if {
	data.plugin == "resource"
	not from_sample_tee
}

from_sample_tee if input.submods.cpu0["ear.veraison.annotated-evidence"].sample
