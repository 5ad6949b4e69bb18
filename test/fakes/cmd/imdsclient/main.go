// Command imdsclient is the IMDS client the interception end-to-end tests
// run inside network namespaces (where the test process cannot dial).
//
//	imdsclient creds                  the Go SDK's default credential chain; prints {"AccessKeyId": …,
//	                                  "SecretDigest": hex SHA-256 of secret key, NUL, session token}
//	imdsclient get  [-base URL] PATH  IMDSv2: PUT a token, GET PATH; prints the body
//	imdsclient load [-base URL] -n 4 -duration 5s
//	                                  n goroutines repeating PUT token, GET
//	                                  security-credentials/, GET the role's
//	                                  document (one keep-alive connection per
//	                                  round, like the SDKs); prints
//	                                  {"ok": N, "failed": M, "errors": [...]};
//	                                  exits 1 if any round failed
//	imdsclient fetches [-base URL] -n 4 -duration 5s
//	                                  n goroutines repeating one SDK credential
//	                                  fetch each on a new connection: PUT a
//	                                  token, GET the listing, GET iam/info,
//	                                  GET the listed role's document; prints
//	                                  {"fetches": {"<listed> <profile ARN>
//	                                  <access key id>": count, …}, "failed":
//	                                  M, "errors": [...]}
//
// The default base is http://169.254.169.254: no endpoint override, exactly
// what an unmodified program does.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/config"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: imdsclient creds|get|load ...")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "creds":
		err = creds()
	case "get":
		err = get(os.Args[2:])
	case "load":
		err = load(os.Args[2:])
	case "fetches":
		err = fetches(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "imdsclient:", err)
		os.Exit(1)
	}
}

func creds() error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cfg, err := config.LoadDefaultConfig(ctx)
	if err != nil {
		return err
	}
	c, err := cfg.Credentials.Retrieve(ctx)
	if err != nil {
		return err
	}
	// The digest lets a test compare the secret and the session token with
	// what STS issued without either being printed.
	sum := sha256.Sum256([]byte(c.SecretAccessKey + "\x00" + c.SessionToken))
	return json.NewEncoder(os.Stdout).Encode(map[string]string{"AccessKeyId": c.AccessKeyID, "Source": c.Source,
		"SecretDigest": hex.EncodeToString(sum[:])})
}

func get(args []string) error {
	fs := flag.NewFlagSet("get", flag.ContinueOnError)
	base := fs.String("base", "http://169.254.169.254", "IMDS base URL")
	if err := fs.Parse(args); err != nil || fs.NArg() != 1 {
		return errors.New("usage: imdsclient get [-base URL] PATH")
	}
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{Proxy: nil}}
	tok, err := token(client, *base)
	if err != nil {
		return err
	}
	body, err := fetch(client, *base+fs.Arg(0), tok)
	if err != nil {
		return err
	}
	_, err = io.WriteString(os.Stdout, body)
	return err
}

func token(c *http.Client, base string) (string, error) {
	req, _ := http.NewRequest(http.MethodPut, base+"/latest/api/token", nil)
	req.Header.Set("X-aws-ec2-metadata-token-ttl-seconds", "21600")
	resp, err := c.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("PUT token: %s", resp.Status)
	}
	return string(b), nil
}

func fetch(c *http.Client, url, tok string) (string, error) {
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	req.Header.Set("X-aws-ec2-metadata-token", tok)
	resp, err := c.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return string(b), nil
}

func load(args []string) error {
	fs := flag.NewFlagSet("load", flag.ContinueOnError)
	base := fs.String("base", "http://169.254.169.254", "IMDS base URL")
	n := fs.Int("n", 4, "concurrent clients")
	dur := fs.Duration("duration", 5*time.Second, "how long to run")
	maxRounds := fs.Int("max-rounds", 20000, "bound on rounds per client")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var (
		mu     sync.Mutex
		ok     int
		failed int
		errs   []string
		wg     sync.WaitGroup
	)
	deadline := time.Now().Add(*dur)
	for range *n {
		wg.Go(func() {
			for r := 0; r < *maxRounds && time.Now().Before(deadline); r++ {
				err := round(*base)
				mu.Lock()
				if err != nil {
					failed++
					if len(errs) < 20 {
						errs = append(errs, time.Now().Format("15:04:05.000")+" "+err.Error())
					}
				} else {
					ok++
				}
				mu.Unlock()
				time.Sleep(5 * time.Millisecond)
			}
		})
	}
	wg.Wait()
	_ = json.NewEncoder(os.Stdout).Encode(map[string]any{"ok": ok, "failed": failed, "errors": errs})
	if failed > 0 {
		return fmt.Errorf("%d of %d rounds failed", failed, ok+failed)
	}
	return nil
}

// round is one SDK credential fetch: PUT, GET listing, GET document, on one
// keep-alive connection (a fresh one per round).
func round(base string) error {
	tr := &http.Transport{Proxy: nil, MaxIdleConnsPerHost: 1}
	defer tr.CloseIdleConnections()
	c := &http.Client{Timeout: 5 * time.Second, Transport: tr}
	tok, err := token(c, base)
	if err != nil {
		return err
	}
	role, err := fetch(c, base+"/latest/meta-data/iam/security-credentials/", tok)
	if err != nil {
		return err
	}
	doc, err := fetch(c, base+"/latest/meta-data/iam/security-credentials/"+strings.TrimSpace(role), tok)
	if err != nil {
		return err
	}
	var d struct{ Code, AccessKeyId string }
	if err := json.Unmarshal([]byte(doc), &d); err != nil || d.Code != "Success" || d.AccessKeyId == "" {
		return fmt.Errorf("bad credential document (code %q, err %v)", d.Code, err)
	}
	return nil
}

// fetches runs SDK-shaped credential fetches and reports what each saw, so a
// test can check that the listing, iam/info and the document of one fetch
// agree whatever switches happen meanwhile.
func fetches(args []string) error {
	fs := flag.NewFlagSet("fetches", flag.ContinueOnError)
	base := fs.String("base", "http://169.254.169.254", "IMDS base URL")
	n := fs.Int("n", 4, "concurrent clients")
	dur := fs.Duration("duration", 5*time.Second, "how long to run")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var (
		mu     sync.Mutex
		seen   = map[string]int{}
		failed int
		errs   []string
		wg     sync.WaitGroup
	)
	deadline := time.Now().Add(*dur)
	for range *n {
		wg.Go(func() {
			for time.Now().Before(deadline) {
				// A new connection per fetch, as botocore and the CLI do.
				c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}}
				got, err := oneFetch(c, *base)
				mu.Lock()
				if err != nil {
					failed++
					if len(errs) < 10 {
						errs = append(errs, err.Error())
					}
				} else {
					seen[got]++
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return json.NewEncoder(os.Stdout).Encode(map[string]any{"fetches": seen, "failed": failed, "errors": errs})
}

func oneFetch(c *http.Client, base string) (string, error) {
	tok, err := token(c, base)
	if err != nil {
		return "", err
	}
	listed, err := fetch(c, base+"/latest/meta-data/iam/security-credentials/", tok)
	if err != nil {
		return "", err
	}
	info, err := fetch(c, base+"/latest/meta-data/iam/info", tok)
	if err != nil {
		return "", err
	}
	doc, err := fetch(c, base+"/latest/meta-data/iam/security-credentials/"+listed, tok)
	if err != nil {
		return "", err
	}
	var i struct{ Code, InstanceProfileArn string }
	var d struct{ Code, AccessKeyId string }
	if err := json.Unmarshal([]byte(info), &i); err != nil || i.Code != "Success" {
		return "", fmt.Errorf("iam/info %q: %v", info, err)
	}
	if err := json.Unmarshal([]byte(doc), &d); err != nil || d.Code != "Success" {
		return "", fmt.Errorf("document of %s: %q: %v", listed, doc, err)
	}
	return listed + " " + i.InstanceProfileArn + " " + d.AccessKeyId, nil
}
