# tpmkms %pre: the system user before the files are unpacked, so that
# %attr(0640,root,tpmkms) on the config resolves (Fedora's
# %sysusers_create_compat). The same text as sysusers.d/tpmkms.conf.
systemd-sysusers --replace=/usr/lib/sysusers.d/tpmkms.conf - <<'SYSUSERS_EOF' || :
u tpmkms - "tpmkms KMS v2 plugin" /var/lib/tpmkms
m tpmkms tss
SYSUSERS_EOF
