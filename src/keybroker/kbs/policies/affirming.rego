# Releases resources only when every appraised component (cpu0, gpu0, ...) of the token is
# "affirming", i.e. met the attestation policy, and there is at least one.
package policy

import rego.v1

default allow := false

allow if {
	data.plugin == "resource"
	count(input.submods) > 0
	every _, submod in input.submods {
		submod["ear.status"] == "affirming"
	}
}
