package fakerestream

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/coder/websocket"
)

// TokenChecker tells whether an access token is currently valid; *Server is
// one.
type TokenChecker interface {
	ValidAccessToken(tok string) bool
}

// WSServer is a fake of Restream's websocket endpoints
// (wss://chat.api.restream.io/ws and wss://streaming.api.restream.io/ws),
// served in plain text on 127.0.0.1 at /ws.
//
// Like Restream it takes the access token only as the accessToken query
// parameter and checks it only at the handshake: a missing, repeated or
// invalid token is refused with 401 and no upgrade. An open connection is
// never checked again, so it outlives the token it was opened with (what
// Restream does then is not documented).
//
// Once connected it sends a hello like Restream chat's
// {"action":"connection_info",...}. Unlike Restream, whose chat ignores
// incoming messages, it echoes each text message back as
// {"action":"echo","payload":"<text>"}, so that tests can see a message
// cross the connection both ways.
//
// All methods are safe for concurrent use.
type WSServer struct {
	tokens TokenChecker
	srv    *http.Server
	url    string

	ctx    context.Context // cancelled by Close: ends every connection
	cancel context.CancelFunc

	serveDone chan struct{}
	wg        sync.WaitGroup // connection goroutines and websocket handlers

	mu      sync.Mutex
	closed  bool
	conns   map[*websocket.Conn]struct{}
	seen    []string // accessToken of every accepted connection, in order
	refused int
}

// NewWebsocket starts a WSServer on 127.0.0.1 with a random port. A
// handshake is accepted only if tokens.ValidAccessToken(accessToken) holds.
func NewWebsocket(tokens TokenChecker) *WSServer {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic("fakerestream: listen: " + err.Error())
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &WSServer{
		tokens:    tokens,
		url:       "http://" + l.Addr().String(),
		ctx:       ctx,
		cancel:    cancel,
		serveDone: make(chan struct{}),
		conns:     make(map[*websocket.Conn]struct{}),
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/ws", s.handleWS)
	s.srv = &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		ConnState: func(_ net.Conn, st http.ConnState) {
			// Connection goroutines count until they close or are hijacked;
			// a hijacked one is counted by its websocket handler instead.
			switch st {
			case http.StateNew:
				s.wg.Add(1)
			case http.StateHijacked, http.StateClosed:
				s.wg.Done()
			}
		},
	}
	go func() {
		defer close(s.serveDone)
		_ = s.srv.Serve(l)
	}()
	return s
}

// URL returns the base URL, e.g. "http://127.0.0.1:12345"; the endpoint is
// URL()+"/ws" (ws:// for a websocket client).
func (s *WSServer) URL() string { return s.url }

// Tokens returns the accessToken that each accepted connection presented, in
// the order they were accepted: Tokens()[n-1] belongs to the connection whose
// hello said "connectionIdentifier":"fake-ws-<n>".
func (s *WSServer) Tokens() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.seen...)
}

// Refused returns how many handshakes were refused for a missing, repeated
// or invalid accessToken.
func (s *WSServer) Refused() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.refused
}

// OpenConns returns how many websocket connections are open now.
func (s *WSServer) OpenConns() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// CloseConnections closes every open websocket connection with status 1001
// (going away), as a server restart would, and returns when each close
// handshake is done (or has timed out after 5 s). The server goes on
// accepting new connections.
func (s *WSServer) CloseConnections() {
	s.mu.Lock()
	conns := make([]*websocket.Conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Go(func() { _ = c.Close(websocket.StatusGoingAway, "fake: closing connections") })
	}
	wg.Wait()
}

// Close stops the server: it closes the listener and every connection,
// websockets included (without a close handshake), and returns when all of
// its goroutines have ended.
func (s *WSServer) Close() {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.cancel()
	_ = s.srv.Close()
	<-s.serveDone
	s.mu.Lock()
	for c := range s.conns {
		_ = c.CloseNow()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// handleWS accepts a websocket whose accessToken query parameter is one
// valid access token, refuses any other handshake with 401, and serves the
// connection until either side ends it.
func (s *WSServer) handleWS(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		http.Error(w, "closing", http.StatusServiceUnavailable)
		return
	}
	s.wg.Add(1) // the connection goroutine's own count keeps this above zero
	s.mu.Unlock()
	defer s.wg.Done()

	toks := r.URL.Query()["accessToken"]
	if len(toks) != 1 || toks[0] == "" || !s.tokens.ValidAccessToken(toks[0]) {
		s.mu.Lock()
		s.refused++
		s.mu.Unlock()
		writeAPIError(w, http.StatusUnauthorized, "invalid_token", "Invalid token: access token is invalid")
		return
	}
	c, err := websocket.Accept(w, r, nil)
	if err != nil {
		return // Accept has answered (e.g. 426 for a request that is not an upgrade)
	}
	defer c.CloseNow()

	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.seen = append(s.seen, toks[0])
	id := len(s.seen)
	s.conns[c] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
	}()
	s.serve(c, id)
}

// serve sends the hello, then echoes each text message, until the peer
// closes, the connection breaks or the server closes.
func (s *WSServer) serve(c *websocket.Conn, id int) {
	if err := s.writeAction(c, map[string]any{
		"action": "connection_info",
		"payload": map[string]any{
			"connectionIdentifier": "fake-ws-" + strconv.Itoa(id),
			"eventSourceId":        1,
			"status":               "connected",
			"target":               "fake",
		},
		"timestamp": time.Now().Unix(),
	}); err != nil {
		return
	}
	for {
		typ, msg, err := c.Read(s.ctx)
		if err != nil {
			return // peer closed, connection broke, or Close
		}
		if typ != websocket.MessageText {
			continue
		}
		if err := s.writeAction(c, map[string]any{"action": "echo", "payload": string(msg)}); err != nil {
			return
		}
	}
}

func (s *WSServer) writeAction(c *websocket.Conn, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(s.ctx, 10*time.Second)
	defer cancel()
	return c.Write(ctx, websocket.MessageText, b)
}
