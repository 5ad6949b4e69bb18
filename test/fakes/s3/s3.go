// Package s3 is a minimal fake of Amazon S3 for end-to-end tests of
// imdsproxy and imdsproxy-issuer: path-style GetObject (GET /<bucket>/<key>),
// HeadObject (HEAD) and PutObject (PUT) over objects the test puts in with
// Put or a client writes.
//
// Answers are shaped like S3's: a quoted hex MD5 ETag, Last-Modified, the
// stored Content-Type and Cache-Control, If-None-Match (304), and the S3 XML
// error document with NoSuchKey, NoSuchBucket and AccessDenied (HEAD answers
// carry no body, as S3's). Every request must carry an AWS Signature
// Version 4 Authorization header whose access key id the test allowed:
// Allow accepts a key id for reads without checking the signature;
// AllowSigned also recomputes the signature with the secret key (the
// payload hash is the X-Amz-Content-Sha256 header value, as S3 signs it)
// and requires X-Amz-Security-Token to equal the session token. Only
// AllowSigned keys may write: a PUT must be signed, and its
// X-Amz-Content-Sha256 must be the SHA-256 of the body (or
// UNSIGNED-PAYLOAD; aws-chunked streaming is not implemented). A bucket made
// public with SetPublicRead answers anonymous GET and HEAD, as a bucket
// behind a CDN does.
//
// All methods are safe for concurrent use.
package s3

import (
	"crypto/md5"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/xml"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/fakes/sigv4"
)

// Call is one request the fake answered.
type Call struct {
	At     time.Time
	Method string // GET or HEAD (or whatever arrived)
	Bucket string
	Key    string
	// AccessKeyID is the key id named in the Authorization header ("" when
	// none could be parsed); SignatureValid reports whether the signature
	// was recomputed with the key's secret and matched.
	AccessKeyID    string
	SignatureValid bool
	Status         int
	Code           string // S3 error code, "" on success or 304
}

type object struct {
	body         []byte
	etag         string // quoted hex MD5
	modified     time.Time
	contentType  string
	cacheControl string
}

// Object is a stored object, as Object returns it.
type Object struct {
	Body         []byte
	ETag         string
	ContentType  string
	CacheControl string
	LastModified time.Time
}

type allowed struct {
	secret       string // "" = do not verify the signature
	sessionToken string
}

// Server is the fake S3.
type Server struct {
	now func() time.Time

	mu      sync.Mutex
	buckets map[string]map[string]object
	keys    map[string]allowed
	public  map[string]bool
	calls   []Call

	// URL is set by Start.
	URL string
}

// New returns an empty fake with no bucket and no allowed key.
func New() *Server {
	return &Server{now: time.Now, buckets: map[string]map[string]object{}, keys: map[string]allowed{}, public: map[string]bool{}}
}

// Start returns a fake S3 served by an httptest server, URL set; it is
// closed when the test ends.
func Start(tb testing.TB) *Server {
	tb.Helper()
	s := New()
	srv := httptest.NewServer(s.Handler())
	s.URL = srv.URL
	tb.Cleanup(srv.Close)
	return s
}

// Put stores body under bucket/key (creating the bucket), replacing any
// object there; its ETag is the quoted hex MD5 of body, its Content-Type
// application/octet-stream.
func (s *Server) Put(bucket, key string, body []byte) {
	s.store(bucket, key, body, "", "")
}

func (s *Server) store(bucket, key string, body []byte, contentType, cacheControl string) object {
	sum := md5.Sum(body)
	if contentType == "" {
		contentType = "application/octet-stream"
	}
	o := object{body: append([]byte(nil), body...), etag: `"` + hex.EncodeToString(sum[:]) + `"`,
		modified: s.now().UTC().Truncate(time.Second), contentType: contentType, cacheControl: cacheControl}
	s.mu.Lock()
	defer s.mu.Unlock()
	b := s.buckets[bucket]
	if b == nil {
		b = map[string]object{}
		s.buckets[bucket] = b
	}
	b[key] = o
	return o
}

// CreateBucket makes an empty bucket (PutObject needs one to exist).
func (s *Server) CreateBucket(bucket string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.buckets[bucket] == nil {
		s.buckets[bucket] = map[string]object{}
	}
}

// SetPublicRead lets anonymous requests (no Authorization header) GET and
// HEAD the objects of bucket, as a public bucket or a CDN in front of one.
func (s *Server) SetPublicRead(bucket string, public bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.public[bucket] = public
}

// Object returns the object at bucket/key, and false if there is none.
func (s *Server) Object(bucket, key string) (Object, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	o, ok := s.buckets[bucket][key]
	return Object{Body: append([]byte(nil), o.body...), ETag: o.etag, ContentType: o.contentType,
		CacheControl: o.cacheControl, LastModified: o.modified}, ok
}

// Delete removes bucket/key; the bucket stays.
func (s *Server) Delete(bucket, key string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.buckets[bucket], key)
}

// ETag returns the quoted ETag of bucket/key, and false if there is none.
func (s *Server) ETag(bucket, key string) (string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	o, ok := s.buckets[bucket][key]
	return o.etag, ok
}

// Allow lets requests whose Authorization header names accessKeyID read
// every object; the signature is not checked. Such a key cannot write.
func (s *Server) Allow(accessKeyID string) {
	s.mu.Lock()
	s.keys[accessKeyID] = allowed{}
	s.mu.Unlock()
}

// AllowSigned lets accessKeyID read and write every object when the
// request's SigV4 signature verifies with secret and, when sessionToken is
// not empty, its X-Amz-Security-Token equals sessionToken.
func (s *Server) AllowSigned(accessKeyID, secret, sessionToken string) {
	s.mu.Lock()
	s.keys[accessKeyID] = allowed{secret: secret, sessionToken: sessionToken}
	s.mu.Unlock()
}

// Calls returns how many requests arrived.
func (s *Server) Calls() int { s.mu.Lock(); defer s.mu.Unlock(); return len(s.calls) }

// CallLog returns every request so far, oldest first.
func (s *Server) CallLog() []Call {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Call(nil), s.calls...)
}

// Handler returns the S3 HTTP handler.
func (s *Server) Handler() http.Handler { return http.HandlerFunc(s.serve) }

// s3Error is an error answer.
type s3Error struct {
	status  int
	code    string
	message string
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request) {
	reqID := newRequestID()
	w.Header().Set("x-amz-request-id", reqID)
	w.Header().Set("Server", "AmazonS3")
	bucket, key, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/"), "/")
	call := Call{At: s.now(), Method: r.Method, Bucket: bucket, Key: key}
	if a, err := sigv4.Parse(r.Header.Get("Authorization")); err == nil {
		call.AccessKeyID = a.AccessKeyID
	}
	status, code := s.answer(w, r, bucket, key, &call, reqID)
	call.Status, call.Code = status, code
	s.mu.Lock()
	s.calls = append(s.calls, call)
	s.mu.Unlock()
}

// answer writes the response and returns its status and error code.
func (s *Server) answer(w http.ResponseWriter, r *http.Request, bucket, key string, call *Call, reqID string) (int, string) {
	fail := func(e s3Error, resource string) (int, string) {
		writeError(w, r, reqID, e, resource)
		return e.status, e.code
	}
	s.mu.Lock()
	anonymous := r.Header.Get("Authorization") == "" && s.public[bucket] &&
		(r.Method == http.MethodGet || r.Method == http.MethodHead)
	s.mu.Unlock()
	if !anonymous {
		if e := s.authorize(r, call); e != nil {
			return fail(*e, r.URL.Path)
		}
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead && r.Method != http.MethodPut {
		return fail(s3Error{http.StatusNotImplemented, "NotImplemented",
			"A header you provided implies functionality that is not implemented"}, r.URL.Path)
	}
	if bucket == "" || key == "" {
		return fail(s3Error{http.StatusNotImplemented, "NotImplemented",
			"This fake implements only GetObject, HeadObject and PutObject, path-style"}, r.URL.Path)
	}
	if r.Method == http.MethodPut {
		return s.putObject(w, r, bucket, key, call, fail)
	}
	s.mu.Lock()
	objs, haveBucket := s.buckets[bucket]
	o, haveKey := objs[key]
	s.mu.Unlock()
	switch {
	case !haveBucket:
		return fail(s3Error{http.StatusNotFound, "NoSuchBucket", "The specified bucket does not exist"}, bucket)
	case !haveKey:
		return fail(s3Error{http.StatusNotFound, "NoSuchKey", "The specified key does not exist."}, key)
	}
	h := w.Header()
	h.Set("ETag", o.etag)
	h.Set("Last-Modified", o.modified.Format(http.TimeFormat))
	if inm := r.Header.Get("If-None-Match"); inm != "" && etagMatches(inm, o.etag) {
		w.WriteHeader(http.StatusNotModified)
		return http.StatusNotModified, ""
	}
	h.Set("Content-Type", o.contentType)
	if o.cacheControl != "" {
		h.Set("Cache-Control", o.cacheControl)
	}
	h.Set("Content-Length", strconv.Itoa(len(o.body)))
	h.Set("Accept-Ranges", "bytes")
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodGet {
		_, _ = w.Write(o.body)
	}
	return http.StatusOK, ""
}

// putObject stores the body of a signed PUT. authorize has checked the
// signature over the claimed payload hash; here the hash must be the
// body's, and the key must be allowed to write.
func (s *Server) putObject(w http.ResponseWriter, r *http.Request, bucket, key string, call *Call,
	fail func(s3Error, string) (int, string)) (int, string) {
	if !call.SignatureValid {
		return fail(s3Error{http.StatusForbidden, "AccessDenied", "Access Denied"}, r.URL.Path)
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, 5<<20+1))
	if err != nil || len(body) > 5<<20 {
		return fail(s3Error{http.StatusBadRequest, "IncompleteBody", "You did not provide the number of bytes specified by the Content-Length HTTP header"}, key)
	}
	switch ph := r.Header.Get("X-Amz-Content-Sha256"); {
	case ph == "UNSIGNED-PAYLOAD":
	case strings.HasPrefix(ph, "STREAMING-"):
		return fail(s3Error{http.StatusNotImplemented, "NotImplemented", "This fake does not implement aws-chunked uploads"}, key)
	case ph != sigv4.PayloadHash(body):
		return fail(s3Error{http.StatusBadRequest, "XAmzContentSHA256Mismatch",
			"The provided 'x-amz-content-sha256' header does not match what was computed."}, key)
	}
	if m := r.Header.Get("Content-Md5"); m != "" {
		sum := md5.Sum(body)
		if m != base64.StdEncoding.EncodeToString(sum[:]) {
			return fail(s3Error{http.StatusBadRequest, "BadDigest", "The Content-MD5 you specified did not match what we received."}, key)
		}
	}
	s.mu.Lock()
	_, haveBucket := s.buckets[bucket]
	s.mu.Unlock()
	if !haveBucket {
		return fail(s3Error{http.StatusNotFound, "NoSuchBucket", "The specified bucket does not exist"}, bucket)
	}
	o := s.store(bucket, key, body, r.Header.Get("Content-Type"), r.Header.Get("Cache-Control"))
	w.Header().Set("ETag", o.etag)
	w.WriteHeader(http.StatusOK)
	return http.StatusOK, ""
}

func etagMatches(header, etag string) bool {
	for _, v := range strings.Split(header, ",") {
		v = strings.TrimSpace(v)
		if v == "*" || strings.TrimPrefix(v, "W/") == etag {
			return true
		}
	}
	return false
}

// authorize checks the Authorization header against the allowed keys.
func (s *Server) authorize(r *http.Request, call *Call) *s3Error {
	denied := &s3Error{http.StatusForbidden, "AccessDenied", "Access Denied"}
	h := r.Header.Get("Authorization")
	if h == "" {
		return denied
	}
	a, err := sigv4.Parse(h)
	if err != nil {
		return &s3Error{http.StatusBadRequest, "AuthorizationHeaderMalformed", err.Error()}
	}
	s.mu.Lock()
	k, ok := s.keys[a.AccessKeyID]
	s.mu.Unlock()
	if !ok {
		return &s3Error{http.StatusForbidden, "AccessDenied", "Access Denied"}
	}
	if k.secret == "" {
		return nil
	}
	if k.sessionToken != "" && r.Header.Get("X-Amz-Security-Token") != k.sessionToken {
		return &s3Error{http.StatusForbidden, "InvalidToken", "The provided token is malformed or otherwise invalid."}
	}
	if a.Service != "s3" {
		return &s3Error{http.StatusForbidden, "SignatureDoesNotMatch", "Credential should be scoped to correct service: 's3'."}
	}
	// S3 signs whatever X-Amz-Content-Sha256 says (a digest or
	// UNSIGNED-PAYLOAD), which it requires with SigV4.
	payloadHash := r.Header.Get("X-Amz-Content-Sha256")
	if amzDate := r.Header.Get("X-Amz-Date"); payloadHash == "" || len(amzDate) < 8 || amzDate[:8] != a.Date ||
		!a.Matches(r, k.secret, payloadHash) {
		return &s3Error{http.StatusForbidden, "SignatureDoesNotMatch",
			"The request signature we calculated does not match the signature you provided. Check your key and signing method."}
	}
	call.SignatureValid = true
	return nil
}

type errorXML struct {
	XMLName   xml.Name `xml:"Error"`
	Code      string   `xml:"Code"`
	Message   string   `xml:"Message"`
	Resource  string   `xml:"Resource,omitempty"`
	RequestID string   `xml:"RequestId"`
}

func writeError(w http.ResponseWriter, r *http.Request, reqID string, e s3Error, resource string) {
	if r.Method == http.MethodHead {
		w.WriteHeader(e.status)
		return
	}
	b, err := xml.Marshal(errorXML{Code: e.code, Message: e.message, Resource: resource, RequestID: reqID})
	if err != nil {
		http.Error(w, "marshal", http.StatusInternalServerError)
		return
	}
	b = append([]byte(xml.Header), b...)
	w.Header().Set("Content-Type", "application/xml")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(e.status)
	_, _ = w.Write(b)
}

func newRequestID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return fmt.Sprintf("%X", b)
}
