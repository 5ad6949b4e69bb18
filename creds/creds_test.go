package creds

import (
	"bytes"
	"fmt"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

func sample() Credentials {
	return Credentials{
		AccessKeyID:     "ASIAEXAMPLEKEYID0001",
		SecretAccessKey: "s3cr3t/SECRETVALUE+abc",
		SessionToken:    "SESSIONTOKENVALUE//xyz==",
		Expires:         time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC),
		AccountID:       "222222222222",
		RoleARN:         "arn:aws:sts::222222222222:assumed-role/app/host",
	}
}

func TestNoSecretInAnyFormat(t *testing.T) {
	c := sample()
	outs := []string{
		c.String(), c.GoString(),
		fmt.Sprintf("%v", c), fmt.Sprintf("%+v", c), fmt.Sprintf("%#v", c),
		fmt.Sprintf("%s", c), fmt.Sprintf("%q", c), fmt.Sprint(c), fmt.Sprintf("%v", &c),
		fmt.Sprintf("%v", []Credentials{c}), fmt.Sprintf("%+v", struct{ C Credentials }{c}),
		fmt.Errorf("wrap: %v", c).Error(),
	}
	var buf bytes.Buffer
	enc := zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig())
	log := zap.New(zapcore.NewCore(enc, zapcore.AddSync(&buf), zap.DebugLevel))
	log.Info("creds", zap.Object("creds", c), zap.Any("any", c), zap.Stringer("str", c))
	_ = log.Sync()
	outs = append(outs, buf.String())
	for i, o := range outs {
		if strings.Contains(o, c.SecretAccessKey) || strings.Contains(o, c.SessionToken) {
			t.Errorf("output %d leaks a secret: %s", i, o)
		}
		if !strings.Contains(o, c.AccessKeyID) {
			t.Errorf("output %d lacks the key id: %s", i, o)
		}
	}
}

func TestValidity(t *testing.T) {
	c := sample()
	now := c.Expires.Add(-time.Minute)
	if !c.ValidAt(now) || c.Remaining(now) != time.Minute {
		t.Fatalf("want valid with 1m left")
	}
	if c.ValidAt(c.Expires) {
		t.Fatalf("credentials must be invalid at their expiry")
	}
	c.SessionToken = ""
	if c.ValidAt(now) || c.Complete() {
		t.Fatalf("incomplete credentials must not be valid")
	}
	if (Credentials{}).IsZero() != true {
		t.Fatalf("zero value must be IsZero")
	}
}

func TestAccountFromARN(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"arn:aws:sts::123456789012:assumed-role/app/s", "123456789012"},
		{"arn:aws:iam::222222222222:role/app", "222222222222"},
		{"arn:aws:iam::2222:role/app", ""},
		{"arn:aws:iam::22222222222x:role/app", ""},
		{"not-an-arn", ""},
		{"", ""},
		{"arn:aws:iam::123456789012", ""},
	} {
		if got := AccountFromARN(tc.in); got != tc.want {
			t.Errorf("AccountFromARN(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}
