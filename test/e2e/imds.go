package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"time"
)

// Paths and headers of the IMDS API, the headers in canonical form (a
// request's Header map may be set directly).
const (
	TokenPath = "/latest/api/token"
	// CredentialsPath lists the role; CredentialsPath + role is its
	// credential document.
	CredentialsPath = "/latest/meta-data/iam/security-credentials/"
	TTLHeader       = "X-Aws-Ec2-Metadata-Token-Ttl-Seconds"
	TokenHeader     = "X-Aws-Ec2-Metadata-Token"
)

// Client is the harnesses' HTTP client for the daemon, its admin listener
// and the stand-ins: no proxy, no compression, a 10 s timeout, up to 64
// idle keep-alive connections per host.
var Client = &http.Client{
	Timeout: 10 * time.Second,
	Transport: &http.Transport{
		Proxy:               nil,
		MaxIdleConnsPerHost: 64,
		DisableCompression:  true,
	},
}

// GetURL GETs url with Client; it returns the status and the body.
func GetURL(url string) (int, string, error) { return get(Client, url) }

func get(client *http.Client, url string) (int, string, error) {
	resp, err := client.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// IMDSToken PUTs TokenPath at base (http://host:port, no trailing slash)
// with client, asking for a session token of ttl seconds. An answer other
// than 200 is an error quoting the body.
func IMDSToken(ctx context.Context, client *http.Client, base string, ttl int) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, base+TokenPath, nil)
	if err != nil {
		return "", err
	}
	req.Header.Set(TTLHeader, strconv.Itoa(ttl))
	resp, err := client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("token PUT: %s: %s", resp.Status, b)
	}
	return string(b), nil
}

// IMDSGet GETs path at base with client and the session token tok (none
// when tok is ""); it returns the status and the body.
func IMDSGet(ctx context.Context, client *http.Client, base, path, tok string) (int, string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+path, nil)
	if err != nil {
		return 0, "", err
	}
	if tok != "" {
		req.Header.Set(TokenHeader, tok)
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// CredDoc is the IMDS credential document; Code is "Success" when it holds
// credentials.
type CredDoc struct {
	Code            string
	Message         string
	LastUpdated     string
	Type            string
	AccessKeyId     string //nolint:revive // wire name
	SecretAccessKey string
	Token           string
	Expiration      string
}

// GetCredDoc GETs the credential document of role at base with client and
// the session token tok. A status other than 200 or a body that is not the
// document is an error; so is a Code other than Success, returned with the
// document.
func GetCredDoc(ctx context.Context, client *http.Client, base, role, tok string) (CredDoc, error) {
	path := CredentialsPath + role
	st, body, err := IMDSGet(ctx, client, base, path, tok)
	if err != nil {
		return CredDoc{}, err
	}
	if st != http.StatusOK {
		return CredDoc{}, fmt.Errorf("GET %s: status %d", path, st)
	}
	var d CredDoc
	if err := json.Unmarshal([]byte(body), &d); err != nil {
		return CredDoc{}, fmt.Errorf("GET %s: bad JSON: %v", path, err)
	}
	if d.Code != "Success" {
		return d, fmt.Errorf("GET %s: Code %q Message %q", path, d.Code, d.Message)
	}
	return d, nil
}
